"""Per-unit context-parallel kinds (issue 17 item 3): hdp with ring-only context parallelism against hdp whose
sharded units each take the fastest of ring, all-gather, Ulysses and 2D (`meshplan plan --cp-kinds`). Prints a
markdown table (figures go to docs/REPRODUCTION.md with the date and machine).

    python -m bench.cp_kinds                     # LLaMA-7B GQA-8 and its MHA variant, 256 x H100, 512K and 2M
    python -m bench.cp_kinds --gpus 64 --tokens 2M --steps 1
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
from collections import Counter
from datetime import date

import numpy as np

from costmodel.specs import Setup
from costmodel.timing import CostModel
from planner.api import PlanRequest, build_cost_model, make_batches
from planner.strategies import PlanOptions, get_strategy
from planner.strategies.cp_kinds import CP_KINDS

M = 2**20
VARIANTS = {"ring only": (), "+ Ulysses, 2D": ("ring", "ulysses", "2d"), "auto": CP_KINDS}


def kind_of(u) -> str:
    """A sharded unit's kind as the table counts it."""
    if u.ulysses == u.degree:
        return "ulysses"
    cp = u.cp or "ring"
    return f"2d-{cp}" if u.ulysses > 1 else cp


def cost_models(req: PlanRequest) -> dict[str, CostModel]:
    """The request's model (LLaMA-7B, GQA-8: Ulysses degree ≤ 8) and its MHA variant (32 KV heads, as the
    original LLaMA-7B: ≤ 32, and 4x the K/V bytes a ring passes), on the same cluster, training and profile."""
    gqa = build_cost_model(req)
    s = gqa.setup
    mha = dataclasses.replace(s.model, name=f"{s.model.name}-mha", kv_heads=s.model.heads)
    return {s.model.name: gqa, mha.name: CostModel(Setup(mha, s.cluster, s.training), gqa.profile)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=256)
    ap.add_argument("--tokens", default="8M", help="tokens per step (M suffix)")
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args()
    tokens = int(float(a.tokens.rstrip("Mm")) * M)
    print(f"\n### Per-unit CP kinds: hdp, {a.gpus} x H100 (dgx-h100, analytic), {tokens // M}M tokens/step, "
          f"{a.steps} step(s) — {date.today()}, {platform.machine()}\n")
    print("| model | lengths | context | recompute | C | lower bound, ring (s) | ring only (s) | + Ulysses, 2D (s) | "
          "auto (s) | lower bound, all kinds (s) | auto speedup | sharded units | kinds chosen (auto) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for lengths in ("byted-like", "github-like"):
        for ctx in (512 * 1024, 2 * M):
            req = PlanRequest(model="llama-7b", cluster="dgx-h100", gpus=a.gpus, lengths=lengths,
                              tokens_per_step=tokens, max_context_tokens=ctx, steps=a.steps)
            for name, cm in cost_models(req).items():
                batches = make_batches(req, cm)
                times, bounds, kinds, sharded = {}, {}, Counter(), 0
                for label, cp_kinds in VARIANTS.items():
                    plan = get_strategy("hdp")
                    steps = [plan(b, cm, PlanOptions(cp_kinds=cp_kinds)) for b in batches]
                    times[label] = float(np.mean([st.predicted.step_time_s for st in steps]))
                    # a plan's bound is over every CP kind once any of its units takes another (bounds.py)
                    bounds[label] = float(np.mean([st.predicted.lower_bound_s for st in steps]))
                    if label == "auto":
                        units = [u for st in steps for u in st.units if u.degree > 1]
                        sharded, kinds = len(units), Counter(map(kind_of, units))
                ring, auto = times["ring only"], times["auto"]
                chosen = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
                print(f"| {name} | {lengths} | {ctx // 1024}K | {cm.setup.training.recompute} | {cm.capacity_tokens} | "
                      f"{bounds['ring only']:.3f} | {ring:.3f} | {times['+ Ulysses, 2D']:.3f} | {auto:.3f} | "
                      f"{bounds['auto']:.3f} | {ring / auto:.3f}x | "
                      f"{sharded} | {chosen} |")


if __name__ == "__main__":
    main()

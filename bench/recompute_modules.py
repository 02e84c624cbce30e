"""What Megatron-core's recompute modules (costmodel.recompute, `--recompute-modules`) cost and save on real layouts:
per module set, a layer's saved activations per token on one rank, its forward and backward time for one
micro-batch, and the per-rank token capacity C that memory leaves, against recompute none, meshplan's selective
and full. Figures from the cost model on analytic profiles, never pass/fail.

    python -m bench.recompute_modules
    python -m bench.recompute_modules --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# bench/ holds scripts named like packages (bench/planner.py): import the real packages, not them.
sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != Path(__file__).resolve().parent]

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from costmodel.presets import load_cluster, load_model  # noqa: E402
from costmodel.recompute import effective_modules  # noqa: E402
from costmodel.specs import Setup, SpecError, TrainingSpec  # noqa: E402
from costmodel.timing import CostModel  # noqa: E402
from profiles.table import load_profile  # noqa: E402

# (label, model, cluster, GPUs, training, tokens of one micro-batch): layouts as Megatron-Bridge's recipes run them
CASES = (
    ("Llama 3 70B TP4 PP4, 8K", "llama3-70b", "dgx-h100", 64, dict(tp=4, pp=4), 8192),
    ("Qwen3-30B-A3B EP8 PP2, 8K", "qwen3-30b-a3b", "dgx-h100", 16,
     dict(tp=1, pp=2, ep=8, etp=1, moe_grouped_gemm=True), 8192),
    ("DeepSeek-V3 TP8 EP8 PP16, 4K", "deepseek-v3", "dgx-h100", 1024,
     dict(tp=8, pp=16, ep=8, moe_grouped_gemm=True), 4096),
)
POLICIES = (("none", None), ("full", None), ("selective", None), ("core_attn", ("core_attn",)),
            ("layernorm,moe_act", ("layernorm", "moe_act")), ("mlp", ("mlp",)), ("moe", ("moe",)),
            ("mla_up_proj", ("mla_up_proj",)), ("layernorm,moe_act,mla_up_proj", ("layernorm", "moe_act", "mla_up_proj")))


def rows() -> list[dict]:
    out = []
    for label, model, cluster, gpus, training, tokens in CASES:
        m, c = load_model(model), load_cluster(cluster).with_gpus(gpus)
        profile = load_profile(c.profile)
        for name, mods in POLICIES:
            policy = name if mods is None else "selective"
            try:
                s = Setup(m, c, TrainingSpec(recompute=policy, recompute_modules=mods, **training))
                if mods and not any(effective_modules(kind, mods) for _, kind in s.stage_model.layer_kinds()):
                    continue  # modules the priced stage's layers do not have: Megatron-core runs none of them
                cm = CostModel(s, profile)
            except SpecError as e:
                if "does not fit" not in str(e):
                    continue  # what Megatron-core refuses
                out.append({"case": label, "recompute": name, "fits": False})
                continue
            u = cm.unit_cost([tokens], with_head=False)
            out.append({"case": label, "recompute": name, "fits": True, "saved_bytes_per_token_layer": cm.a_tok,
                        "fwd_ms": u.fwd_s * 1e3, "bwd_ms": u.bwd_s * 1e3, "capacity_tokens": cm.capacity_tokens})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    data = rows()
    t = Table(title="Recompute modules: saved activations, one micro-batch's stage time, capacity "
              "(selective: meshplan's; module lists: Megatron-core's)")
    for col in ("case", "recompute", "KB/token/layer", "fwd ms", "bwd ms", "C tokens"):
        t.add_column(col, justify="left" if col in ("case", "recompute") else "right")
    for r in data:
        if not r["fits"]:
            t.add_row(r["case"], r["recompute"], "does not fit", "", "", "")
            continue
        t.add_row(r["case"], r["recompute"], f"{r['saved_bytes_per_token_layer'] / 1024:.1f}", f"{r['fwd_ms']:.1f}",
                  f"{r['bwd_ms']:.1f}", f"{r['capacity_tokens']:,}")
    Console(width=max(Console().width, 110)).print(t)
    if args.json:
        args.json.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()

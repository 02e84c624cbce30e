"""A context-parallel ring step's attention kernels on this CPU, measured against what the cost model prices.

    python -m bench.ring_kernels [--profile P] [--lengths 1450,2899,8192] [--degree 2] [--repeats 15]

One document of N tokens sharded zigzag over `--degree` members: member 0's block pairs for each ring step (its own
keys: one causal call over both its chunks; another member's: one full rectangle), run by the executor's fused CPU
kernel (planner/runtime/cp.py, FusedCPUBlocks) on one thread, forward and backward, the minimum over repeats. Beside
them the same shapes by the raw kernel (causal square, rectangle) and the cost model's price per step from the
profile's attention table (`t_attn(c)` own, `2·t_full(c/2)` others; the former `4·t_attn(c/2)` every step), for the
model's heads (tiny: 4 query and 2 K/V heads of 16). Figures, never pass/fail."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

# bench/ holds scripts named like packages (bench/planner.py): import the real packages, not them.
sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from planner.runtime.cp import Document, FusedCPUBlocks, shard_layout  # noqa: E402
from profiles.measure import TimingConfig, time_op  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16  # tiny's


def _min_s(fn, repeats: int) -> float:
    """The fastest of `repeats` calls after a warm-up (profiles.measure.time_op: the collector paused)."""
    return min(time_op(lambda _: fn(), TimingConfig(warmup=1, repeats=repeats, min_repeats=repeats,
                                                    budget_s=math.inf)))


def executor_steps_s(n: int, degree: int, repeats: int) -> list[tuple[float, float]]:
    """(forward, backward) seconds of member 0's attention for each ring step (step 0: its own keys)."""
    lays = [shard_layout([Document(0, torch.arange(n))], degree, i) for i in range(degree)]
    t = lays[0].tokens
    g = torch.Generator().manual_seed(0)
    q = torch.randn(HEADS, t, HEAD_DIM, generator=g)
    kvs = [torch.randn(2, KV_HEADS, t, HEAD_DIM, generator=g) for _ in range(degree)]
    kern = FusedCPUBlocks(lays[0], dict(enumerate(lays)), 0, 1 << 20, torch.device("cpu"))
    scale = HEAD_DIM ** -0.5
    out = []
    for s in range(degree):
        m = (0 - s) % degree
        o, lse = kern.forward(q, kvs[m][0], kvs[m][1], m, scale)
        dout = torch.randn_like(o)
        f = _min_s(lambda: kern.forward(q, kvs[m][0], kvs[m][1], m, scale), repeats)
        b = _min_s(lambda: kern.backward(dout, q, kvs[m][0], kvs[m][1], o, lse, m, scale), repeats)
        out.append((f, b))
    return out


def raw_s(lq: int, lk: int, causal: bool, repeats: int) -> tuple[float, float]:
    """(forward, backward) seconds of one call of torch's CPU flash kernel, K/V heads expanded as the executor does."""
    aten = torch.ops.aten
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM) for n in (lq, lk, lk))
    o, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=HEAD_DIM ** -0.5)
    dout = torch.randn_like(o)
    f = _min_s(lambda: aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal,
                                                                        scale=HEAD_DIM ** -0.5), repeats)
    b = _min_s(lambda: aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, o, lse, 0.0, causal, scale=HEAD_DIM ** -0.5), repeats)
    return f, b


def priced_s(profile: str, c: int) -> dict[str, tuple[float, float]]:
    """The cost model's (forward, backward) per ring step for a member of c tokens: own, other, former (every step)."""
    from planner.api import PlanRequest, build_cost_model

    cm = build_cost_model(PlanRequest(model="tiny", cluster="local-cpu", gpus=1, profile=profile, dtype="fp32",
                                      max_context_tokens=4096))
    x = 1.0 / cm.compute_share  # one rank alone: the table's own speed
    return {"own": (x * float(cm.attn_fwd_s(c)), x * float(cm.attn_bwd_s(c))),
            "other": tuple(x * 2 * float(cm.attn_full_s(c / 2, w)) for w in ("fwd", "bwd")),
            "former": (x * 4 * float(cm.attn_fwd_s(c / 2)), x * 4 * float(cm.attn_bwd_s(c / 2)))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="local-cpu.measured", help="profile whose attention table prices the steps")
    ap.add_argument("--lengths", default="1450,2899,8192", help="document lengths, comma-separated")
    ap.add_argument("--degree", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"ring steps of member 0, zigzag over {a.degree}; tiny's heads; one thread; ms forward / backward; "
          f"priced from {a.profile}")
    print("| document | tokens a member | step | executor | raw kernel | priced | former price |")
    print("|---|---|---|---|---|---|---|")
    for n in (int(x) for x in a.lengths.split(",")):
        steps = executor_steps_s(n, a.degree, a.repeats)
        c = 2 * -(-n // (2 * a.degree))
        price = priced_s(a.profile, c)
        raw = {"own": raw_s(c, c, True, a.repeats), "other": raw_s(c, c // 2, False, a.repeats)}
        for s, (f, b) in enumerate(steps):
            kind = "own" if s == 0 else "other"
            cells = [f"{x[0] * 1e3:.2f} / {x[1] * 1e3:.2f}" for x in ((f, b), raw[kind], price[kind], price["former"])]
            print(f"| {n} | {c} | {s} ({kind}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

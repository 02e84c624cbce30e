"""Achieved bandwidth of the elementwise kernels an eager layer runs, beside the memory table's own kernel (y = x + 1,
profiles/measure/memory.py), at sizes past the last-level cache: how far "bytes / table bandwidth" is from each kind.

    python -m bench.elementwise_kinds                    # this machine's default device (CUDA when present)
    python -m bench.elementwise_kinds --tokens 32768 --hidden 4096 --json out.json

Each kind is one PyTorch call on a [tokens, width] operand, its bytes the elements it reads and writes (a broadcast
operand and a row statistic count once per row); time = median of the timed calls (CUDA events, L2 flushed first;
CPU: wall time). Figures, never pass/fail."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

# bench/ holds scripts named like packages (bench/planner.py): import the real packages, not them.
sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from profiles.measure import TimingConfig, time_op  # noqa: E402

TIMING = TimingConfig(warmup=3, repeats=20, min_repeats=5, budget_s=2.0)


@dataclass(frozen=True)
class KindResult:
    kind: str
    what: str
    bytes: int  # read + written
    time_s: float
    gb_per_s: float
    vs_table: float  # this kind's bandwidth / the table kernel's at the same tokens


def kinds(t: int, h: int, vocab_rows: int, vocab: int, device: str) -> dict[str, tuple[str, Callable, int]]:
    """name -> (what, call, bytes moved) on fresh operands."""
    bf, f32 = torch.bfloat16, torch.float32
    x32 = torch.randn(t, h, device=device, dtype=f32)
    x16 = x32.to(bf)
    w32 = torch.randn(h, device=device, dtype=f32)
    g16, u16 = torch.randn_like(x16), torch.randn_like(x16)
    heads = max(1, h // 128)
    qkv = torch.randn(t, 3 * h, device=device, dtype=bf)
    att = torch.randn(heads, t, 128, device=device, dtype=bf)
    logits = torch.randn(vocab_rows, vocab, device=device, dtype=bf)
    n = t * h
    return {
        "table_add": ("y = x + 1, bf16 (the memory table's kernel)", lambda _: torch.add(x16, 1.0), 4 * n),
        "add_fp32": ("y = x + 1, fp32 (the eager residual stream)", lambda _: torch.add(x32, 1.0), 8 * n),
        "residual": ("fp32 stream + bf16 branch -> fp32", lambda _: x32 + g16, 10 * n),
        "cast": ("fp32 -> bf16 (autocast at a GEMM)", lambda _: x32.to(bf), 6 * n),
        "bcast_mul": ("fp32 x · w[h] (norm weight)", lambda _: x32 * w32, 8 * n + 4 * h),
        "row_mean_sq": ("x.pow(2).mean(-1), fp32 (RMSNorm statistic, two kernels)",
                        lambda _: x32.pow(2).mean(-1, keepdim=True), 12 * n + 4 * t),
        "silu_mul": ("silu(g) · u, bf16 (two kernels)", lambda _: F.silu(g16) * u16, 10 * n),
        "qkv_slice_copy": ("Q out of fused QKV rows, bf16 (strided read)", lambda _: qkv[:, :h].contiguous(), 4 * n),
        "head_transpose": ("[H, T, D] -> [T, H, D] contiguous, bf16", lambda _: att.transpose(0, 1).contiguous(),
                           4 * heads * t * 128),
        "cat3": ("cat of three [T, h] bf16", lambda _: torch.cat([g16, u16, x16], dim=1), 12 * n),
        "log_softmax": (f"log_softmax over {vocab} logits, bf16 in, fp32 out", lambda _: F.log_softmax(
            logits.float(), -1), vocab_rows * vocab * (2 + 4 + 4 + 4)),
    }


def run(tokens: int, hidden: int, vocab: int, device: str) -> list[KindResult]:
    vocab_rows = max(1, tokens * hidden // vocab)  # the same elements as one [tokens, hidden] operand
    table = kinds(tokens, hidden, vocab_rows, vocab, device)
    out: list[KindResult] = []
    base = None
    for name, (what, call, nbytes) in table.items():
        s = statistics.median(time_op(call, TIMING, device=device))
        bw = nbytes / s / 1e9
        base = base or bw
        out.append(KindResult(name, what, nbytes, s, bw, bw / base))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    rows = run(a.tokens, a.hidden, a.vocab, a.device)
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(f"{name}, tokens {a.tokens}, width {a.hidden}, torch {torch.__version__}")
    print(f"{'kind':<15} {'MB':>8} {'ms':>9} {'GB/s':>8} {'vs table':>8}  what")
    for r in rows:
        print(f"{r.kind:<15} {r.bytes / 1e6:>8.1f} {r.time_s * 1e3:>9.3f} {r.gb_per_s:>8.0f} {r.vs_table:>8.2f} "
              f" {r.what}")
    if a.json:
        a.json.write_text(json.dumps({"device": name, "tokens": a.tokens, "hidden": a.hidden, "vocab": a.vocab,
                                      "torch": torch.__version__, "kinds": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

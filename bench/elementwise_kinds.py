"""Achieved bandwidth of the elementwise kernels an eager layer runs, beside the memory table's own kernel (y = x + 1,
profiles/measure/memory.py), at sizes past the last-level cache: how far "bytes / table bandwidth" is from each kind.

    python -m bench.elementwise_kinds                    # this machine's default device (CUDA when present)
    python -m bench.elementwise_kinds --tokens 32768 --hidden 4096 --json out.json

Each kind is one PyTorch call on a [tokens, width] operand, its bytes the elements it reads and writes (a broadcast
operand and a row statistic count once per row); time = median of the timed calls (CUDA events, L2 flushed first;
CPU: wall time). Figures, never pass/fail."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# bench/ holds scripts named like packages (bench/planner.py): import the real packages, not them.
sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from profiles.measure.memory import KIND_OF_KERNEL, KIND_TIMING, KIND_VOCAB, kind_constants, measure_kinds  # noqa: E402


@dataclass(frozen=True)
class KindResult:
    kind: str
    what: str
    bytes: int  # read + written
    time_s: float
    gb_per_s: float
    vs_table: float  # this kind's bandwidth / the table kernel's at the same tokens


def run(tokens: int, hidden: int, vocab: int, device: str) -> list[KindResult]:
    """profiles/measure/memory.py's kind kernels (what `meshplan profile` measures), with more repeats."""
    timing = dataclasses.replace(KIND_TIMING, warmup=3, repeats=20, min_repeats=5, budget_s=2.0)
    measured = measure_kinds(device, tokens, hidden, vocab, timing)
    base = measured["table_add"][1] / measured["table_add"][2]
    return [KindResult(name, what, nbytes, s, nbytes / s / 1e9, nbytes / s / base)
            for name, (what, nbytes, s) in measured.items()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=KIND_VOCAB)
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
    main = "bf16" if a.device == "cuda" else "fp32"  # the reference `meshplan profile` takes on a GPU / most CPUs
    consts = kind_constants({r.kind: (r.what, r.bytes, r.time_s) for r in rows}, a.device, main)
    print("profile constants (x table bandwidth): " + ", ".join(f"{k} {v['value']:.2f}" for k, v in consts.items())
          + f"  (kinds: {KIND_OF_KERNEL})")
    if a.json:
        a.json.write_text(json.dumps({"device": name, "tokens": a.tokens, "hidden": a.hidden, "vocab": a.vocab,
                                      "torch": torch.__version__, "kinds": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

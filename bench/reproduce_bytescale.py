"""Regenerate the ByteScale section of docs/REPRODUCTION.md (the same as `meshplan whatif reproduce`).

    python bench/reproduce_bytescale.py [--gpu-scale 1] [--tokens-per-step 32M] [--steps 2] [--workers 2]

Plans LLaMA-7B/13B/30B/70B and Mistral-8x7B/8x22B at the paper's GPU counts (× --gpu-scale), 256K-2M,
github-like and byted-like, with static / hdp-naive / hdp; the table and its journal live in a temp
folder (--table to choose), so an interrupted run resumes. The reproduction itself is
planner/studies/bytescale.py; this script only parses its options.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.studies import ByteScaleGrid, reproduce_bytescale  # noqa: E402
from planner.workload import parse_tokens  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "REPRODUCTION.md")
    ap.add_argument("--table", type=Path, default=None)
    ap.add_argument("--gpu-scale", type=float, default=1.0)
    ap.add_argument("--tokens-per-step", default="32M")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    a = ap.parse_args()
    grid = ByteScaleGrid(gpu_scale=a.gpu_scale, tokens_per_step=parse_tokens(a.tokens_per_step), steps=a.steps)
    cmd = " ".join(["python bench/reproduce_bytescale.py", *sys.argv[1:]])
    done, total = itertools.count(1), grid.total_points()

    def on_point(point, row) -> None:  # one line per point on stderr
        print(f"ByteScale grid {next(done)}/{total} {point.label}", file=sys.stderr)

    rep = reproduce_bytescale(a.doc, grid, table=a.table, workers=a.workers, on_point=on_point, command=cmd)
    print(f"{rep.computed} points planned in {rep.elapsed_s:.0f} s; layouts "
          + ", ".join(f"{m} tp{tp}/pp{pp}" for m, (tp, pp) in rep.layouts.items()))
    print(f"wrote the ByteScale section of {a.doc}; table {', '.join(map(str, rep.paths))}")


if __name__ == "__main__":
    main()

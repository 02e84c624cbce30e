"""Replay peak memory vs tokens per rank: one unit of documents packed over N CPU ranks (context
parallelism, ring or all-gather), one step under torchrun; each rank's peak RSS from the trace.

    python bench/replay_memory.py [--nproc 4] [--tokens-per-rank 4096 8192 16384] [--cp ring] [--model tiny]

The unit holds documents of 4096, 2048, 1024 and 512 tokens in turn (the last one cut to fit), so the
attention work is Σ s² over documents while a dense mask would be (N·T)². A first run with a
512-token unit gives the process floor (torch, gloo, model); `above floor` is what the unit
added, `saved` what autograd kept for backward (the trace's saved_bytes, largest rank). Prints a
table and one JSON line. Figures, never pass/fail."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/ holds scripts named like packages (bench/planner.py): import the real packages, not them.
sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != Path(__file__).resolve().parent]

DOC_TOKENS = (4096, 2048, 1024, 512)  # document lengths, cycled


def doc_lengths(total_tokens: int) -> list[int]:
    out, i = [], 0
    while sum(out) < total_tokens:
        out.append(min(DOC_TOKENS[i % len(DOC_TOKENS)], total_tokens - sum(out)))
        i += 1
    return out


def unit_plan(total_tokens: int, ranks: int):
    """One step, one unit over all ranks holding doc_lengths(total_tokens) as whole documents."""
    from planner.plan import Mesh, Piece, Plan, Predicted, Sequence, Step, Unit, validate, zigzag_tokens_per_rank

    lengths = doc_lengths(total_tokens)
    unit = Unit(id=0, hdp_ranks=tuple(range(ranks)), pieces=tuple(Piece(i, 0, n) for i, n in enumerate(lengths)),
                offload_ratio=0.0, tokens_per_rank=zigzag_tokens_per_rank(lengths, ranks))
    step = Step(step=0, global_tokens=total_tokens, sequences=[Sequence(i, n) for i, n in enumerate(lengths)],
                units=[unit], order={r: [0] for r in range(ranks)},
                predicted=Predicted(1.0, 0.5, [0.5] * ranks, [1e6] * ranks))
    plan = Plan(meta={"model": "tiny", "strategy": "hand-built"}, mesh=Mesh(ranks, 1, 1, ranks), steps=[step])
    validate(plan)
    return plan


def replay_peaks(total_tokens: int, args: argparse.Namespace, work: Path) -> dict:
    """Peak RSS per rank (bytes) and the wall time of one replayed step of a unit of total_tokens."""
    plan, trace = work / f"plan-{total_tokens}.json", work / f"trace-{total_tokens}.json"
    unit_plan(total_tokens, args.nproc).save(plan)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           "-m", "planner.runtime", str(plan), "--model", args.model, "--steps", "1", "--cp", args.cp,
           "--trace", str(trace)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"})
    wall_s = time.perf_counter() - t0
    if res.returncode:
        return {"error": (res.stderr.strip().splitlines() or ["?"])[-1][:200], "wall_s": wall_s}
    units = json.loads(trace.read_text())["steps"][0]["units"]
    return {"peak_rss_bytes": {u["rank"]: u["peak_memory_bytes"] for u in units}, "wall_s": wall_s,
            "tokens_per_rank": units[0]["tokens"], "saved_bytes": max(u["saved_bytes"] for u in units)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--tokens-per-rank", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--cp", choices=("ring", "allgather"), default="ring")
    p.add_argument("--model", default="tiny")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        floor = replay_peaks(512, args, Path(tmp))
        floor_b = max(floor["peak_rss_bytes"].values())
        print(f"floor (512-token unit): max peak RSS {floor_b / 2**20:.0f} MB per rank")
        print(f"{'tokens/rank':>11} {'unit tokens':>11} {'peak RSS/rank MB (max)':>22} {'above floor MB':>14} "
              f"{'saved MB':>8} {'wall s':>7}")
        for t in args.tokens_per_rank:
            r = replay_peaks(t * args.nproc, args, Path(tmp))
            if "error" in r:
                print(f"{t:>11} {t * args.nproc:>11} failed: {r['error']}")
                rows.append({"tokens_per_rank": t, **r})
                continue
            peak = max(r["peak_rss_bytes"].values())
            print(f"{r['tokens_per_rank']:>11} {t * args.nproc:>11} {peak / 2**20:>22.0f} "
                  f"{(peak - floor_b) / 2**20:>14.0f} {r['saved_bytes'] / 2**20:>8.0f} {r['wall_s']:>7.1f}")
            rows.append({"tokens_per_rank": r["tokens_per_rank"], "unit_tokens": t * args.nproc,
                         "peak_rss_mb_per_rank": {k: round(v / 2**20) for k, v in r["peak_rss_bytes"].items()},
                         "above_floor_mb": round((peak - floor_b) / 2**20),
                         "autograd_saved_mb": round(r["saved_bytes"] / 2**20), "wall_s": round(r["wall_s"], 1)})
    print(json.dumps({"replay_memory": {"nproc": args.nproc, "cp": args.cp, "model": args.model,
                                        "floor_mb": round(floor_b / 2**20), "rows": rows}}))


if __name__ == "__main__":
    main()

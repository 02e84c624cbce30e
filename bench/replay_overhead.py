"""Replay overhead: per-step wall time of `planner.runtime` under torchrun vs a plain single-process
loop (the --check reference: one sequence at a time, full-sequence causal attention, same
optimizer) on the same tokens and the same model.

    python bench/replay_overhead.py --nproc 2 --steps 6 --tokens-per-step 4096 [--model tiny|cpu-small] [--cp ring]
        [--pp 2]

Prints a table and one JSON line. Every process gets OMP_NUM_THREADS threads (default 1), the
single-process loop too, so with N ranks on >= N cores the ideal replay step is loop / N plus
communication. Step 0 is warm-up and excluded from the medians. Figures, never pass/fail."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/ holds scripts named like packages (bench/planner.py): import the real packages, not them.
sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != Path(__file__).resolve().parent]


# A Llama-shaped model big enough that compute, not per-unit bookkeeping, dominates a CPU step.
CPU_SMALL = {"name": "cpu-small", "layers": 4, "hidden": 256, "heads": 8, "kv_heads": 2, "head_dim": 32, "ffn": 704,
             "vocab": 1024, "source": "bench/replay_overhead.py: a CPU-sized Llama-style model"}


def plan_for(args: argparse.Namespace, path: Path) -> None:
    from planner.api import PlanRequest, make_plan

    req = PlanRequest(model=args.model, cluster="local-cpu", gpus=args.nproc, pp=args.pp, profile=args.profile,
                      lengths=args.lengths, tokens_per_step=args.tokens_per_step, max_context_tokens=args.max_context,
                      capacity_tokens=args.capacity, seed=args.seed)
    make_plan(req, args.strategy).save(path)


def replay(args: argparse.Namespace, plan: Path, trace: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           "-m", "planner.runtime", str(plan), "--model", args.model, "--steps", str(args.steps), "--cp", args.cp,
           "--trace", str(trace), "--seed", str(args.seed)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    job_s = time.perf_counter() - t0
    if res.returncode:
        sys.exit(f"replay failed:\n{res.stderr[-3000:]}")
    doc = json.loads(trace.read_text())
    steps = doc["steps"][1:]
    ranks = [r for s in steps for r in s["ranks"]]
    units = [u for s in steps for u in s["units"]]
    return {"step_s": statistics.median(s["step_time_s"] for s in steps),
            "units_s_max": statistics.median(max(r["units_s"] for r in s["ranks"]) for s in steps),
            "grad_sync_s": statistics.median(r["grad_sync_s"] for r in ranks),
            "optimizer_s": statistics.median(r["optimizer_s"] for r in ranks),
            "cpu_s_all_ranks": statistics.median(sum(r["cpu_s"] for r in s["ranks"]) for s in steps),
            "comm_wait_s_per_step": sum(u["comm_wait_s"] for u in units) / len(steps) / args.nproc,
            "job_s": job_s, "units": len(doc["steps"][0]["units"])}


def single_process(args: argparse.Namespace, plan_path: Path) -> dict:
    from costmodel.presets import load_model
    from planner.plan import Plan
    from planner.runtime import ReplayOptions
    from planner.runtime.check import reference_loop
    from planner.runtime.model import ModelConfig

    times = reference_loop(Plan.load(plan_path), ModelConfig(load_model(args.model)), args.steps,
                           ReplayOptions(plan_path=plan_path, seed=args.seed), threads=args.threads)
    return {"step_s": statistics.median(w for w, _ in times[1:]), "cpu_s": statistics.median(c for _, c in times[1:])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (nproc = pp × HDP ranks)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--model", default="tiny", help="preset, spec file, or cpu-small (defined here)")
    p.add_argument("--cp", choices=("ring", "allgather"), default="ring")
    p.add_argument("--strategy", default="hdp")
    p.add_argument("--lengths", default="lognormal:median=300,sigma=1.0,max=2048")
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--capacity", type=int, default=1024, help="tokens per rank C (longer sequences are sharded)")
    p.add_argument("--profile", default="h100-sxm.analytic", help="profile the planner prices units with")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    label = args.model
    with tempfile.TemporaryDirectory() as d:
        if args.model == "cpu-small":
            args.model = str(Path(d) / "cpu-small.json")
            Path(args.model).write_text(json.dumps(CPU_SMALL))
        plan = Path(d) / "plan.json"
        plan_for(args, plan)
        rep = replay(args, plan, Path(d) / "trace.json")
        ref = single_process(args, plan)
    ratio = rep["step_s"] / ref["step_s"]
    args.model = label
    print(f"model {label}, {args.tokens_per_step} tokens/step, {args.strategy} plan on {args.nproc} ranks "
          f"(pp {args.pp}) "
          f"({rep['units']} unit records/step), cp {args.cp}, {args.threads} thread(s) per process, "
          f"{os.cpu_count()} cores")
    cpu_ratio = rep["cpu_s_all_ranks"] / ref["cpu_s"]
    print(f"  load average {os.getloadavg()[0]:.2f} (wall times include whatever else ran on the cores)")
    print(f"  single-process loop   {ref['step_s'] * 1e3:9.1f} ms/step wall, {ref['cpu_s'] * 1e3:.1f} ms CPU")
    print(f"  replay (slowest rank) {rep['step_s'] * 1e3:9.1f} ms/step wall = {ratio:.2f}x the loop "
          f"(ideal {1 / args.nproc:.2f}x with {args.nproc} cores free)")
    print(f"  replay CPU, all ranks {rep['cpu_s_all_ranks'] * 1e3:9.1f} ms/step = {cpu_ratio:.2f}x the loop's work")
    print(f"    units (max rank)    {rep['units_s_max'] * 1e3:9.1f} ms, "
          f"grad all-reduce {rep['grad_sync_s'] * 1e3:.1f} ms,"
          f" optimizer {rep['optimizer_s'] * 1e3:.1f} ms, P2P wait per rank {rep['comm_wait_s_per_step'] * 1e3:.1f} ms")
    print(f"  whole torchrun job    {rep['job_s']:9.1f} s for {args.steps} steps "
          "(process start and rendezvous included)")
    print(json.dumps({"bench": "replay_overhead", **vars(args), "loop": ref, "replay": rep,
                      "replay_over_loop_wall": ratio, "replay_over_loop_cpu": cpu_ratio}))


if __name__ == "__main__":
    main()

"""The Megatron-Bridge H100 set priced step by step: what each mechanism its recipes run (fp8 current scaling, fp8
weights, overlapped gradient reduce and parameter gather, TP comm overlap) moves in `meshplan validate --set
megatron_bridge2025`. Prints one markdown row per step; docs/BENCHMARKS.md "Megatron-Bridge on H100".

    python -m bench.bridge_steps
"""

from __future__ import annotations

import dataclasses

import numpy as np

from planner.studies.validation import iteration_memory, iteration_row, load_calibration_set
from profiles.table import load_profile

MECHANISMS = ("fp8_recipe", "fp8_param_gather", "overlap_grad_reduce", "overlap_param_gather", "tp_comm_overlap")
STEPS = (("delayed scaling, nothing overlapped", ()),
         ("+ tensorwise (current scaling)", ("fp8_recipe",)),
         ("+ fp8 weights (fp8_param_gather)", ("fp8_recipe", "fp8_param_gather")),
         ("+ overlapped gradient reduce and parameter gather",
          ("fp8_recipe", "fp8_param_gather", "overlap_grad_reduce", "overlap_param_gather")),
         ("+ TP overlap: the recipes as they ran", MECHANISMS))


def main() -> None:
    cal = load_calibration_set("megatron_bridge2025")
    profile = load_profile("h100-sxm.analytic")
    base = {k: v for k, v in cal.training.items() if k not in MECHANISMS}
    print("| priced as | " + " | ".join(c.label for c in cal.iteration_cases) + " | MAPE | needs per GPU |")
    print("|---" * (len(cal.iteration_cases) + 3) + "|")
    for name, on in STEPS:
        step = dataclasses.replace(cal, training={**base, **{k: cal.training[k] for k in on}})
        errors = [iteration_row(step, c, profile).error for c in step.iteration_cases]
        needs = [iteration_memory(step, c, profile).needed_bytes / 1e9 for c in step.iteration_cases]
        print(f"| {name} | " + " | ".join(f"{e:+.1%}" for e in errors)
              + f" | {np.mean(np.abs(errors)):.1%} | {min(needs):.1f}-{max(needs):.1f} GB |")


if __name__ == "__main__":
    main()

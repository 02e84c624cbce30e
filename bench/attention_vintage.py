"""The H100 sets of `meshplan validate` priced with three generations of attention kernel: FlashAttention-3 (the
analytic profile's table), cuDNN as of July 2024 and FlashAttention-2, at the rates FlashAttention-3's paper measured
on an H100 SXM5 (profiles.analytic.HOPPER_ATTENTION; TrainingSpec.attention_kernel fa3, cudnn-2024, fa2). The sets'
runs span March 2024 to 2026: which generation each set's errors agree with reads as the kernels its software ran;
a set records its kernel only where its sources name it (docs/BENCHMARKS.md "Attention by year"). Nothing is fitted.

    python -m bench.attention_vintage        # the same as: meshplan validate --set S --attention-kernel K
"""

from __future__ import annotations

import numpy as np

from planner.studies.validation import load_calibration_set, validate_cost_model
from profiles.table import load_profile

PROFILE = "h100-sxm.analytic"
KERNELS = {"fa3": "FlashAttention-3", "cudnn-2024": "cuDNN, July 2024", "fa2": "FlashAttention-2"}
# set, when its runs ran (its source note)
SETS = (("nemo_longseq2024", "NeMo 24.03 (March 2024)"), ("llama3_2024", "Meta, Llama 3 pre-training (2024)"),
        ("nemo2024", "NeMo 24.07 (July 2024)"), ("megatron_bridge2025", "Megatron-Bridge 25.09-26.02"))


def cell(errors: list[float]) -> str:
    return f"{np.mean(np.abs(errors)):.1%} ({min(errors):+.0%}..{max(errors):+.0%})"


def main() -> None:
    profile = load_profile(PROFILE)
    print("| set | runs | kernel it records | as recorded | " + " | ".join(KERNELS.values()) + " |")
    print("|---" * (len(KERNELS) + 4) + "|")
    for name, when in SETS:
        own = load_calibration_set(name).training.get("attention_kernel", "flash")
        cells = [cell([r.error for r in validate_cost_model(profile, name).rows])]
        cells += [cell([r.error for r in validate_cost_model(profile, name, k).rows]) for k in KERNELS]
        print(f"| {name} | {when} | {own} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

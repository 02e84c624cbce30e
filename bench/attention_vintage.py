"""The H100 sets of `meshplan validate` priced with three generations of attention kernel: FlashAttention-3 (the
analytic profile's rates), cuDNN as of mid-2024 and FlashAttention-2, each as FlashAttention-3's paper measured
them on an H100 SXM5 (arXiv 2407.08608, Figs. 5-6, head dim 128, 16K tokens: forward non-causal 648 / 595 / 370,
forward causal 616 / 539 / 335, backward 561 / 516 / 322 TFLOP/s). The sets' runs span March 2024 to 2026: which
generation each set's errors agree with reads as the kernels its software ran. A diagnostic: the shipped profile
is not changed and nothing is fitted. Prints one markdown row per set; docs/BENCHMARKS.md "Attention by year".

    python -m bench.attention_vintage
"""

from __future__ import annotations

import dataclasses

import numpy as np

from planner.studies.validation import validate_cost_model
from profiles.table import Profile, load_profile

PROFILE = "h100-sxm.analytic"
# TFLOP/s at 16K, head dim 128, H100 SXM5: (forward non-causal, forward causal, backward) [FA3 paper, Figs. 5-6]
KERNELS = {"FlashAttention-3 (the profile)": (648.0, 616.0, 561.0), "cuDNN, mid-2024": (595.0, 539.0, 516.0),
           "FlashAttention-2": (370.0, 335.0, 322.0)}
# set, when its runs ran (its source note)
SETS = (("nemo_longseq2024", "NeMo 24.03 (March 2024)"), ("llama3_2024", "Meta, Llama 3 pre-training (2024)"),
        ("nemo2024", "NeMo 24.07 (July 2024)"), ("megatron_bridge2025", "Megatron-Bridge 25.09-26.02"))


def with_kernel(base: Profile, rates: tuple[float, float, float], name: str) -> Profile:
    """`base` with each attention row's time scaled by FlashAttention-3's rate over `rates` for its direction."""
    fa3 = KERNELS["FlashAttention-3 (the profile)"]
    df = base.tables["attention"].copy()
    fwd = df["direction"] == "fwd"
    scale = np.where(fwd & ~df["causal"].astype(bool), fa3[0] / rates[0],
                     np.where(fwd, fa3[1] / rates[1], fa3[2] / rates[2]))
    df["time_s"] = df["time_s"].astype(float) * scale
    fp = dataclasses.replace(base.fingerprint, sha256="", name=f"{base.fingerprint.name}, {name} attention")
    return Profile(fingerprint=fp, tables={**base.tables, "attention": df}, constants=base.constants)


def main() -> None:
    base = load_profile(PROFILE)
    profiles = {k: with_kernel(base, rates, k) for k, rates in KERNELS.items()}
    print("| set | runs | " + " | ".join(KERNELS) + " |")
    print("|---" * (len(KERNELS) + 2) + "|")
    for name, when in SETS:
        cells = []
        for k in KERNELS:
            errors = [r.error for r in validate_cost_model(profiles[k], name).rows]
            cells.append(f"{np.mean(np.abs(errors)):.1%} ({min(errors):+.0%}..{max(errors):+.0%})")
        print(f"| {name} | {when} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

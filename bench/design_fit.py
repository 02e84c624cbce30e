"""The sustained large-GEMM fraction of each analytic GPU nobody measured here, fitted to its design set
(planner.studies.design_fit): the loss curve (mean |log(predicted / published)| over the set's rows) at a few
fractions, the fit, and the fraction the profile states. B200 is fitted too, as a check on the Hopper ratios it
carries (it keeps them). Nothing held out enters.

    python -m bench.design_fit
"""

from __future__ import annotations

from planner.studies.design_fit import fit_gemm_rate_x, gemm_rate_loss
from profiles import analytic

HOPPER_X = analytic.HOPPER_GEMM_SUSTAINED.value / analytic.HOPPER_MAMF_BF16
FITS = (("a100-sxm-80gb: MAMF 271.2 TFLOP/s", analytic.A100_MAMF, "korthikanti2022", analytic.A100_GEMM_X.value),
        ("gb200: rates from the rack's peaks", analytic.GB200_STATED, "megatron_bridge_gb200_2025",
         analytic.GB200_GEMM_X.value),
        ("b200: Hopper's ratios", analytic.B200, "megatron_bridge_b200_2025", 1.0))


def main() -> None:
    grid = (1.0, 0.95, 0.9, round(HOPPER_X, 3))
    print("| GPU (rates as stated) | design set | " + " | ".join(f"x {x:g}" for x in grid)
          + " | fit | profile's x |")
    print("|---|---|" + "---|" * (len(grid) + 2))
    for label, gpu, set_name, stated in FITS:
        losses = [gemm_rate_loss(gpu, x, set_name) for x in grid]
        fit = fit_gemm_rate_x(gpu, set_name)
        print(f"| {label} | {set_name} | " + " | ".join(f"{v:.1%}" for v in losses)
              + f" | {fit:.3f} ({gemm_rate_loss(gpu, fit, set_name):.1%}) | {stated:g} |")


if __name__ == "__main__":
    main()

"""An analytic GPU profile's sustained large-GEMM rate fitted to its design set (validation.DESIGN_SETS).

Nobody publishes the rate a GPU's GEMMs keep up for a whole training step: the MAMF (stas00's best shape of a sweep)
is a burst, and on an H200 the GEMMs of a millisecond or more ran at 0.85 of it (profiles.analytic, measured). Where
no GPU of the kind can be measured, the one physical quantity left open, the sustained rate as a fraction x of the
stated one (bf16 and fp8 alike), is fitted to the design set's published runs: the x of least mean
|log(predicted / published)| over its rows, found by golden-section search. The held-out sets never enter.

    python -m bench.design_fit      # the fits and their loss curves
"""

from __future__ import annotations

import math

import numpy as np

from planner.studies.validation import DESIGN_SETS, validate_cost_model
from profiles.analytic import Const, GpuNumbers, build, with_gemm_rate_x

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def gemm_rate_loss(gpu: GpuNumbers, x: float, set_name: str) -> float:
    """Mean |log(predicted / published)| over a design set's rows with `gpu`'s large-GEMM rates at x."""
    if set_name not in DESIGN_SETS:
        raise ValueError(f"{set_name!r} is held out: fit only to a design set ({', '.join(sorted(DESIGN_SETS))})")
    report = validate_cost_model(build(with_gemm_rate_x(gpu, Const(x, "x", "trial"))), set_name)
    return float(np.mean([abs(math.log1p(r.error)) for r in report.rows]))


def fit_gemm_rate_x(gpu: GpuNumbers, set_name: str, lo: float = 0.80, hi: float = 1.05,
                    tol: float = 0.001) -> float:
    """The x in [lo, hi] of least gemm_rate_loss, to within `tol` (golden-section search: the loss of one rate
    is unimodal in it)."""
    a, b = lo, hi
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = gemm_rate_loss(gpu, c, set_name), gemm_rate_loss(gpu, d, set_name)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = gemm_rate_loss(gpu, c, set_name)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = gemm_rate_loss(gpu, d, set_name)
    return round((a + b) / 2.0, 3)

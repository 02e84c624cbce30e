"""Analytic profiles: the Profile tables built from datasheet peaks and published measurements
(REFERENCE.md §8), for GPUs we cannot measure here; the Hopper ones also take two measurements of our own H200
(the sustained GEMM rate and the elementwise kinds, from h200-sxm.measured; the other GPUs take the kinds as an
assumption). Every constant carries its source; the
generated files in profiles/data/*.analytic.json are written by `python -m profiles.analytic`
and checked against this module by the tests (never edited by hand)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from profiles.table import Fingerprint, Profile, attention_flops, bus_factor, quantised_gemm_flops

GB = 1e9
KiB = 2**10
MiB = 2**20
GiB = 2**30
ANALYTIC_DATE = "2026-11-22"  # snapshot date of the REFERENCE.md numbers


@dataclass(frozen=True)
class Const:
    value: float
    unit: str
    source: str


@dataclass(frozen=True)
class GpuNumbers:
    """The published numbers one analytic profile is built from."""

    name: str  # profile name stem
    device: str
    peak_bf16: Const  # dense BF16 peak
    gemm_large: Const  # achieved large-GEMM FLOP/s under training load (sustained: measured, or fitted, or derived)
    attn_plateau: dict[str, Const]  # "fwd_noncausal", "fwd_causal", "bwd": fraction of peak at long lengths
    ar_plateau_intra: Const  # 8-GPU intra-node all-reduce busbw plateau
    p2p_intra: Const  # NVLink P2P bandwidth per direction
    a2a_intra: Const  # intra-node all-to-all busbw plateau
    nic: Const  # per-GPU scale-out line rate
    h2d: Const  # pinned host->device
    d2h: Const  # pinned device->host
    hbm: Const  # achievable device-memory bandwidth of a streaming elementwise kernel
    sms: Const  # streaming multiprocessors: the tiles of one wave (GEMM wave quantisation)
    gemm_tile_m: Const  # output tile of the library's large bf16 GEMM kernel, rows (the m side) ...
    gemm_tile_n: Const  # ... and columns; the transposed tile is taken too where it quantises better
    # Dense fp8 (E4M3) GEMMs: the datasheet peak and the achieved large-GEMM rate. None: no fp8 tensor cores (A100),
    # no fp8 GEMM rows (and no constants: files built before fp8 keep their sha256)
    peak_fp8: Const | None = None
    gemm_large_fp8: Const | None = None
    domain_gpus: Const | None = None  # GPUs per NVLink domain; None: the 8-GPU HGX baseboard (no constant written)
    # GEMM work at half the large-size rate, at a 989 TFLOP/s peak (scaled with the dtype's peak); None: the
    # shared assumption GEMM_HALF_FLOPS_AT_989T
    gemm_half: Const | None = None
    # Elementwise kinds' bandwidth over the memory table's stream (constants memory_kind_<kind>); None: every kernel
    # priced as a stream (no constants written)
    memory_kinds: dict[str, Const] | None = None
    # Attention kernels with published rates on this GPU (TrainingSpec.attention_kernel), each's plateaus as
    # attn_plateau's; attn_plateau is the one named `attn_kernel`. None: only the profile's own kernel is known
    attn_kernels: dict[str, dict[str, Const]] | None = None
    attn_kernel: str | None = None
    # Document length at half the plateau, per key, where this GPU's kernel was measured per length; None: S_HALF
    attn_s_half: dict[str, Const] | None = None


# Shared, GPU-independent numbers -------------------------------------------------------------
S_HALF = {  # document length at which attention reaches half its plateau efficiency
    "fwd_noncausal": Const(200, "tokens", "REFERENCE 8.2 analytic fallback fit to FA3 Figs. 5-6 [assumption]"),
    "fwd_causal": Const(550, "tokens", "REFERENCE 8.2 analytic fallback fit to FA3 Figs. 5-6 [assumption]"),
    "bwd": Const(400, "tokens", "REFERENCE 8.2 analytic fallback fit to FA3 Figs. 5-6 [assumption]"),
}
GEMM_HALF_FLOPS_AT_989T = Const(2e10, "FLOP", "GEMM reaches half of its large-size efficiency near 2e10 FLOP "
                                "(about 20 us at H100 rate) [assumption]; scaled with the peak")
HGX_DOMAIN_GPUS = 8  # GPUs of an HGX/DGX baseboard: the NVLink domain of every profile without domain_gpus
GEMM_FLOOR = Const(5e-6, "s", "kernel launch + tail floor for a GEMM [assumption]")
# 8xH200 all-reduce busbw (NCCL 2.30): 32 KiB 3.2, 1 MiB 74.6, 16 MiB 255.9, 256 MiB 441.9, 1 GiB 465.9 GB/s
AR_SHAPE = Const(0, "-", "shape of 8xH200 all-reduce busbw vs size [meas: stas00, REFERENCE 8.3], "
                 "normalised by its 1 GiB value and applied to every intra-node AR/AG/RS")
_AR_SHAPE_POINTS = [(32 * KiB, 3.2), (1 * MiB, 74.6), (16 * MiB, 255.9), (256 * MiB, 441.9), (1 * GiB, 465.9)]
INTER_SHAPE = Const(0, "-", "inter-node plateau needs >= 1 GiB: 12.5% at 16 MiB, 44% at 256 MiB "
                    "[REFERENCE 8.3]; 1.4% at 1 MiB [meas: stas00 B200]; 80% at 1 GiB [assumption]")
_INTER_SHAPE_POINTS = [(1 * MiB, 0.014), (16 * MiB, 0.125), (256 * MiB, 0.44), (1 * GiB, 0.80), (16 * GiB, 1.0)]
NIC_EFF = Const(0.73, "x", "achieved / line rate on the wire, 4x8 B200 400G EFA [meas: stas00, REFERENCE 8.3]")
P2P_NIC_EFF = Const(0.90, "x", "48-49 GB/s achievable per 400G NIC [NVIDIA staff, nccl-tests #267]; rounded down")
FLOOR_INTRA = Const(18e-6, "s", "intra-node all-reduce floor, 8 GPUs back-to-back [meas: stas00, REFERENCE 8.3]")
FLOOR_P2P = Const(10.5e-6, "s", "small all-to-all / send-recv floor, one node [meas: DeepEP #303]")
FLOOR_INTER_256 = Const(65e-6, "s", "multi-node all-reduce floor at 256 ranks [meas: NCCL #652]")
FLOOR_INTER_P2P = Const(15e-6, "s", "inter-node send/recv floor (IB verbs latency + NCCL) [assumption]")
HOST_COPY_FLOOR = Const(10e-6, "s", "cudaMemcpyAsync latency floor [assumption]")
PAGEABLE_FACTOR = Const(0.5, "x", "pageable copies run at about half the pinned rate [assumption]")
KERNEL_FLOOR = Const(5e-6, "s", "launch + tail of a small elementwise kernel, eager PyTorch on a busy stream "
                     "[assumption]; the memory table's smallest time")
HBM_EFF = Const(0.88, "x", "achieved / spec HBM bandwidth of a streaming kernel: 1.80 of 2.04 TB/s on A100 80GB "
                "SXM, the best kernels near 90% [meas: NVIDIA developer forum thread 339083]")


# GEMM tile/wave quantisation: the GPU runs whole output tiles in whole waves of one tile per SM, so a GEMM costs the
# padded problem's time (Profile.gemm_time_s); the generic curve is the best-shape (MAMF) rate. No small-k derate:
# no published sweep found that isolates k, and the curve's small-FLOPs derate already covers small problems.
_TILE_HOPPER = ("bf16 output tile 128x256: NVIDIA gemm_tile_hint (128, 256), the 'representative cuBLAS tile' whose "
                "wave/tile shape search matched exhaustive H200/B200 grids [stas00 ml-engineering mamf-finder.py]; "
                "cuBLAS sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64 in H100 traces [code search]")
_TILE_AMPERE = ("bf16 output tile 256x128: 256x128 and 128x256 the most efficient cuBLAS tiles, A100 quantisation "
                "measured with 256x128 tiles [NVIDIA Matrix Multiplication Background guide 2.3, 3.1]")
TILE_HOPPER_M = Const(128, "elements", _TILE_HOPPER)
TILE_HOPPER_N = Const(256, "elements", _TILE_HOPPER)
TILE_AMPERE_M = Const(256, "elements", _TILE_AMPERE)
TILE_AMPERE_N = Const(128, "elements", _TILE_AMPERE)


def _hbm(spec_bytes_per_s: float, gpu: str) -> Const:
    return Const(spec_bytes_per_s * HBM_EFF.value, "B/s",
                 f"{gpu} HBM {spec_bytes_per_s / 1e12:.2f} TB/s [spec] x {HBM_EFF.value} achieved [derived]")


def _c(v: float, unit: str, src: str) -> Const:
    return Const(v, unit, src)


# Attention kernels on Hopper as FlashAttention-3's paper measured them on one H100 SXM5 (arXiv 2407.08608, Figs. 5-6:
# head dim 128, batch x length = 16K tokens; TFLOP/s forward non-causal, forward causal, backward at each length of
# ATTN_PAPER_LENGTHS). Which one a training run used is a fact of its software stack (TrainingSpec.attention_kernel),
# not of the GPU; the kernels part most on short documents (causal forward at 512: cuDNN 1.08x FA3's rate, FA2 0.65x).
_FA3_PAPER = "[FA3 paper, arXiv 2407.08608, Figs. 5-6]"
ATTN_PAPER_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
_HOPPER_ATTENTION_TFLOPS = {
    "fa3": ("FlashAttention-3", {"fwd_noncausal": (467, 565, 625, 638, 646, 648),
                                 "fwd_causal": (292, 423, 521, 579, 602, 616),
                                 "bwd": (316, 424, 501, 542, 559, 561)}),
    "cudnn-2024": ("cuDNN as of July 2024", {"fwd_noncausal": (497, 574, 617, 609, 600, 595),
                                              "fwd_causal": (315, 410, 484, 518, 529, 539),
                                              "bwd": (305, 408, 465, 499, 518, 516)}),
    "fa2": ("FlashAttention-2", {"fwd_noncausal": (309, 350, 362, 368, 370, 370),
                                 "fwd_causal": (191, 260, 298, 319, 333, 335),
                                 "bwd": (214, 260, 291, 310, 318, 322)})}
_ATTN_WHAT = {"fwd_noncausal": "fwd non-causal", "fwd_causal": "fwd causal", "bwd": "bwd"}
# Head dim 64 against 128 at 16K, per kernel: the same figures' hd64 panels (forward non-causal FA3 497, FA2 324;
# backward FA3 474, FA2 291 TFLOP/s). No causal hd64 panel was found: causal forward takes the non-causal ratio.
_HD64_TFLOPS = {"fa3": (497, 474), "fa2": (324, 291)}  # (fwd non-causal, bwd) at hd64; hd128 in the series above


def _hd64_x(g: GpuNumbers) -> dict[str, Const]:
    """The table kernel's head-dim-64 rate over its head-dim-128 rate, per key (fwd_noncausal, fwd_causal, bwd).
    Blackwell (no kernel of its own published) takes FA3's; A100's FA2 takes FA2's as measured on an H100."""
    k = g.attn_kernel if g.attn_kernel in _HD64_TFLOPS else "fa3"
    name, series = _HOPPER_ATTENTION_TFLOPS[k]
    fwd, bwd = _HD64_TFLOPS[k]
    note = ("" if g.attn_kernels is HOPPER_ATTENTION else
            f" [assumption: its attention on {g.name} scales with head dim as {name}'s on an H100]")
    fwd_x = _c(fwd / series["fwd_noncausal"][-1], "x", f"{name} hd64 over hd128, fwd non-causal at 16K: {fwd} / "
               f"{series['fwd_noncausal'][-1]} TFLOP/s, H100 SXM5 {_FA3_PAPER}{note}")
    return {"fwd_noncausal": fwd_x,
            "fwd_causal": _c(fwd_x.value, "x", f"{fwd_x.source}; causal as non-causal [assumption: no causal hd64 "
                             "panel]"),
            "bwd": _c(bwd / series["bwd"][-1], "x", f"{name} hd64 over hd128, bwd at 16K: {bwd} / {series['bwd'][-1]} "
                      f"TFLOP/s, H100 SXM5 {_FA3_PAPER}{note}")}


# plateaus: each kernel's rate at the paper's longest length, as a fraction of the dense BF16 peak
HOPPER_ATTENTION = {
    k: {key: _c(tf[-1] / 989, "x", f"{name} {_ATTN_WHAT[key]} {tf[-1]} TFLOP/s at 16K, hd128, H100 SXM5 {_FA3_PAPER}")
        for key, tf in series.items()}
    for k, (name, series) in _HOPPER_ATTENTION_TFLOPS.items()}


# Hopper GEMMs sustained: the MAMF (stas00's best shape over a sweep, 794.5 bf16 / 1,453 fp8 TFLOP/s) is a short
# burst; GEMMs that run for milliseconds, as a training step's do, run slower. Measured on an H200
# (h200-sxm.measured): its best bf16 shape reaches 783 TFLOP/s (the MAMF), but one shape at m = 16K and m = 32K
# runs 751 and 680 (0.7 and 1.6 ms), and the median of its bf16 GEMMs of >= 1 ms is 673 (fp8: 1,226), 0.85 of the
# MAMF in both dtypes. Fitted on the H200 replays' real training steps, `meshplan calibrate` finds the MAMF curve's
# GEMMs x 1.15 ± 0.014 too fast (bench/data/h200-2026-12-04*). H100 SXM and H800 SXM: the same die, clocks and
# 700 W limit as the H200 SXM. Unmeasured GPUs (A100, GB200): the sustained rate fitted to their design set
# (with_gemm_rate_x below).
HOPPER_SUSTAINED_MIN_S = 1e-3


def with_gemm_rate_x(g: "GpuNumbers", x: Const) -> "GpuNumbers":
    """`g` with its large-GEMM rates (bf16, and fp8 where it has one) at x.value times theirs: a GPU whose sustained
    rate nobody measured, the fraction x fitted to its design set's published runs (planner.studies.design_fit)."""
    def times(c: Const | None) -> Const | None:
        return None if c is None else Const(c.value * x.value, c.unit, f"{c.source}; x {x.value:g}: {x.source}")
    return replace(g, gemm_large=times(g.gemm_large), gemm_large_fp8=times(g.gemm_large_fp8))


def sustained_gemm_flops(measured: Profile, dtype: str, min_s: float = HOPPER_SUSTAINED_MIN_S) -> float:
    """Median achieved FLOP/s of a measured profile's GEMMs of `dtype` that run at least `min_s`."""
    g = measured.tables["gemm"]
    g = g[(g["dtype"] == dtype) & (g["time_s"] >= min_s)]
    if g.empty:
        raise ValueError(f"profile {measured.fingerprint.name!r} has no {dtype} GEMM of >= {min_s} s")
    return float(np.median(2.0 * g["m"] * g["n"] * g["k"] / g["time_s"]))


def fit_gemm_half_flops(measured: Profile, g: "GpuNumbers") -> float:
    """The half-efficiency work (at a 989 TFLOP/s peak) that makes g's analytic GEMM curve, quantised as the
    tables look it up (table.quantised_gemm_flops), best match a measured profile's bf16 and fp8 GEMMs: the least
    mean |log(predicted / measured)| over a log grid of 41 points from 1e8 to 1e11 FLOP."""
    rates = {"bf16": (g.gemm_large.value, g.peak_bf16.value)}
    if g.gemm_large_fp8 is not None and g.peak_fp8 is not None:
        rates["fp8"] = (g.gemm_large_fp8.value, g.peak_fp8.value)
    rows = measured.tables["gemm"]
    rows = rows[rows["dtype"].isin(list(rates))]
    m, n, k = (rows[c].to_numpy(dtype=float) for c in ("m", "n", "k"))
    padded = np.array([quantised_gemm_flops(mi, int(ni), int(ki), g.sms.value, g.gemm_tile_m.value,
                                            g.gemm_tile_n.value) for mi, ni, ki in zip(m, n, k)])
    large = rows["dtype"].map(lambda d: rates[d][0]).to_numpy()
    peak = rows["dtype"].map(lambda d: rates[d][1]).to_numpy()
    memory_s = (m * k + k * n + m * n) * 2.0 / g.hbm.value
    grid = np.geomspace(1e8, 1e11, 41)
    loss = [np.mean(np.abs(np.log(np.maximum.reduce([np.full_like(m, GEMM_FLOOR.value), memory_s,
                                                     (padded + x * peak / 989e12) / large])
                                  / rows["time_s"].to_numpy()))) for x in grid]
    return float(grid[int(np.argmin(loss))])


HOPPER_GEMM_SUSTAINED = _c(673.3e12, "FLOP/s", "median rate of the bf16 GEMMs of >= 1 ms in h200-sxm.measured "
                           "[meas: meshplan on an H200, 2026-12-04]; MAMF 794.5 [stas00] is the best shape's burst; "
                           "H100/H800 SXM: the H200's die, clocks and 700 W limit [spec]")
HOPPER_GEMM_SUSTAINED_FP8 = _c(1226.3e12, "FLOP/s", "median rate of the fp8 GEMMs of >= 1 ms in h200-sxm.measured "
                               "[meas: meshplan on an H200, 2026-12-04]; MAMF 1,453.4 [stas00] is the best shape's "
                               "burst; H100/H800 SXM: the H200's die, clocks and 700 W limit [spec]")
# Hopper GEMMs' half-efficiency work, fitted (fit_gemm_half_flops) to the H200's 170 measured bf16 and fp8 GEMMs
# (256-32K rows) with the tables' tile, wave and split-K quantisation: 6.3e9 FLOP, about 9 us of work at the bf16
# rate, where the shared assumption's 2e10 (and no split-K) had the shapes under one wave 1.2-5.3x too slow.
HOPPER_GEMM_HALF = _c(6.31e9, "FLOP", "GEMM work at half the large-size rate (at 989 TFLOP/s; scaled with the "
                      "dtype's peak): fitted to the bf16 and fp8 GEMMs of h200-sxm.measured [meas: meshplan on an "
                      "H200, 2026-12-04]: mean |error| 10.0% over its 170 shapes (2e10 without split-K: 50.6%); "
                      "fitted on the bf16 shapes alone, the fp8 ones within 10.6%; H100/H800 SXM: the H200's die "
                      "and clocks [spec]")
# Elementwise kinds on Hopper, measured on an H200 by `meshplan profile --ops memory` (h200-sxm.measured;
# docs/COSTMODEL.md "Elementwise kinds"): ratios of one kernel's bandwidth to another's on the same SMs and HBM.
_KINDS_SRC = "x the memory table's stream, measured on an H200 [meas: meshplan profile --ops memory, 2026-12-04]"
HOPPER_MEMORY_KINDS = {k: _c(v, "x table bandwidth", f"{k}: {v} {_KINDS_SRC}")
                       for k, v in (("broadcast", 0.7125), ("mixed", 0.716), ("softmax", 0.5276), ("strided", 0.4135))}
# Other NVIDIA GPUs take Hopper's ratios: the kinds are how a kernel's access pattern (broadcast operands, mixed
# dtypes, long softmax rows, strided reads) loses against a stream, which no one has measured on them; every kernel
# priced as a stream was the other assumption, 1.68x optimistic on the H200's memory-bound time (docs/BENCHMARKS.md).
_AS_HOPPER = "[assumption: a kernel kind's bandwidth over a stream as measured on Hopper]"
KINDS_AS_HOPPER = {k: _c(c.value, c.unit, f"{c.source}; {_AS_HOPPER}") for k, c in HOPPER_MEMORY_KINDS.items()}

H100 = GpuNumbers(
    name="h100-sxm", device="NVIDIA H100 SXM 80GB (analytic)",
    peak_bf16=_c(989e12, "FLOP/s", "H100 SXM datasheet dense BF16 [spec]"),
    gemm_large=HOPPER_GEMM_SUSTAINED,
    attn_plateau=HOPPER_ATTENTION["fa3"], attn_kernels=HOPPER_ATTENTION, attn_kernel="fa3",
    ar_plateau_intra=_c(465.9e9, "B/s", "8xH200 all-reduce busbw at 1 GiB; H100 has the same NVLink4 [meas: stas00]"),
    p2p_intra=_c(378e9, "B/s", "NVLink4 P2P 376-380 of 450 GB/s per direction [REFERENCE 8.1]"),
    a2a_intra=_c(370e9, "B/s", "NVLink4's effective rate for collectives other than all-reduce, ~370 GB/s busbw of 450 "
                 "line rate after protocol overhead [NVIDIA's S. Jeaugey, nccl-tests #212]; 285 [assumption] before "
                 "2026-12-05"),
    nic=_c(50e9, "B/s", "400 Gb/s NDR per GPU [spec]"),
    h2d=_c(35.2e9, "B/s", "H2D pinned, SM-copy path [meas: nvbandwidth #24]"),
    d2h=_c(52.8e9, "B/s", "D2H pinned, SM-copy path [meas: nvbandwidth #24]"),
    hbm=_hbm(3.35e12, "H100 SXM"),
    sms=_c(132, "SMs", "H100 SXM5 132 SMs [spec: NVIDIA H100 whitepaper; 132 in stas00 mamf-finder H100 tests]"),
    gemm_tile_m=TILE_HOPPER_M, gemm_tile_n=TILE_HOPPER_N,
    peak_fp8=_c(1979e12, "FLOP/s", "H100 SXM datasheet dense FP8 (3,958 with sparsity) [spec, REFERENCE 8.1]"),
    gemm_large_fp8=HOPPER_GEMM_SUSTAINED_FP8, memory_kinds=HOPPER_MEMORY_KINDS, gemm_half=HOPPER_GEMM_HALF,
)

# A100: the MAMF as stated, then the sustained fraction fitted to Korthikanti et al.'s A100 runs (the design set):
# 0.954, a milder loss than Hopper's measured 0.847 at 700 W (MAMF itself: mean |log error| 4.0% over the set's 12
# rows; Hopper's 0.847: 8.0%; the fit 1.8%; 0.95 and 1.3% before the backward's GEMMs took their own shapes).
A100_FA2 = {
    "fwd_noncausal": _c(0.70, "x", "FA2 on A100: 50-73% of peak forward [FA2 paper]; upper part of the range"),
    "fwd_causal": _c(0.70 * 335 / 370, "x", "0.70 x FA2 causal/non-causal ratio on H100 (335/370) [derived]"),
    "bwd": _c(0.70 * 322 / 370, "x", "0.70 x FA2 bwd/fwd ratio on H100 (322/370) [derived]"),
}
# The kernels FA2 replaced, on the A100 by the FA2 paper's own comparison (arXiv 2307.08691 §4.1, Figs. 4, 6, 7):
# FA2 "around 2x faster than FlashAttention" (v1, CUDA) and "around 1.3-1.5x faster than FlashAttention in Triton in
# the forward pass and around 2x faster in the backward pass" (its Triton port, which MPT ran as attn_impl triton).
_FA2_OVER = "[FA2 paper, arXiv 2307.08691, §4.1: A100, head dims 64 and 128, 512 to 16K tokens]"


def _slower(plateau: dict[str, Const], x_fwd: float, x_bwd: float, what: str) -> dict[str, Const]:
    return {key: _c(c.value / (x_bwd if key == "bwd" else x_fwd), "x",
                    f"FA2's {c.value:.3f} / {x_bwd if key == 'bwd' else x_fwd}: {what} {_FA2_OVER}")
            for key, c in plateau.items()}


A100_ATTENTION = {"fa2": A100_FA2,
                  "fa1": _slower(A100_FA2, 2.0, 2.0, "FA2 'around 2x faster than FlashAttention'"),
                  "fa1-triton": _slower(A100_FA2, 1.4, 2.0, "FA2 '1.3-1.5x faster than FlashAttention in Triton in "
                                        "the forward pass and around 2x faster in the backward pass' (1.4: the "
                                        "forward range's middle)")}
A100_MAMF = GpuNumbers(
    name="a100-sxm-80gb", device="NVIDIA A100 SXM 80GB (analytic)",
    peak_bf16=_c(312e12, "FLOP/s", "A100 datasheet dense BF16 [spec]"),
    gemm_large=_c(271.2e12, "FLOP/s", "MAMF large BF16 GEMM [meas: stas00 ml-engineering]"),
    attn_plateau=A100_FA2, attn_kernels=A100_ATTENTION, attn_kernel="fa2",
    ar_plateau_intra=_c(234.9e9, "B/s", "8xA100 all-reduce busbw at 16 GiB [meas: ml-engineering]"),
    p2p_intra=_c(274e9, "B/s", "NVLink3 P2P 274 of 300 GB/s per direction [REFERENCE 8.1]"),
    a2a_intra=_c(274e9 * 370 / 378, "B/s", "H100 a2a/p2p ratio (370/378) applied to A100 P2P [derived]"),
    nic=_c(25e9, "B/s", "200 Gb/s HDR per GPU on DGX A100 [spec]"),
    h2d=_c(25.1e9, "B/s", "H2D pinned on A100 [meas: nvbandwidth #42]"),
    d2h=_c(25.1e9, "B/s", "D2H taken equal to H2D (PCIe Gen4) [assumption]"),
    hbm=_hbm(2.039e12, "A100 SXM 80GB"),
    sms=_c(108, "SMs", "A100 108 SMs [spec; NVIDIA Matrix Multiplication Background guide 3.2]"),
    gemm_tile_m=TILE_AMPERE_M, gemm_tile_n=TILE_AMPERE_N, memory_kinds=KINDS_AS_HOPPER,
)
A100_GEMM_X = _c(0.954, "x", "sustained / MAMF fitted to the design set korthikanti2022 (its 12 A100 rows, mean "
                 "|log error| 4.0% -> 1.8%) [fit: planner.studies.design_fit, python -m bench.design_fit]")
A100 = with_gemm_rate_x(A100_MAMF, A100_GEMM_X)

# Jean Zay's A100 partition (BLOOM's cluster, validation set bloom2022): the A100's node, with 4 Omni-Path links of
# 100 Gb/s per 8 GPUs between nodes instead of the DGX A100's 8 x 200 Gb/s HDR
A100_OPA = replace(
    A100, name="a100-sxm-80gb-opa", device="NVIDIA A100 SXM 80GB, 4 x 100 Gb/s Omni-Path per 8 GPUs (analytic)",
    nic=_c(4 * 100e9 / 8 / 8, "B/s", "4 x 100 Gb/s Omni-Path links per node of 8 A100s, 6.25 GB/s a GPU [spec: "
           "bigscience-workshop/bigscience train/tr11-176B-ml/README.md, Jean Zay gpu_p5]; the achieved share "
           "NIC_EFF is the shared assumption (measured on EFA, not Omni-Path)"))

H200 = GpuNumbers(
    name="h200-sxm", device="NVIDIA H200 SXM 141GB (analytic)",
    peak_bf16=_c(989e12, "FLOP/s", "H200 datasheet dense BF16 [spec]"),
    gemm_large=H100.gemm_large, attn_plateau=H100.attn_plateau, attn_kernels=H100.attn_kernels,
    attn_kernel=H100.attn_kernel,
    ar_plateau_intra=_c(465.9e9, "B/s", "8xH200 all-reduce busbw at 1 GiB, NVLS [meas: stas00]"),
    p2p_intra=H100.p2p_intra, a2a_intra=H100.a2a_intra, nic=H100.nic, h2d=H100.h2d, d2h=H100.d2h,
    hbm=_hbm(4.8e12, "H200 SXM"),
    sms=_c(132, "SMs", "H200 SXM 132 SMs, the H100 SXM5 configuration [spec]"),
    gemm_tile_m=H100.gemm_tile_m, gemm_tile_n=H100.gemm_tile_n,
    peak_fp8=_c(1979e12, "FLOP/s", "H200 SXM datasheet dense FP8 [spec, REFERENCE 8.1]"),
    gemm_large_fp8=HOPPER_GEMM_SUSTAINED_FP8, memory_kinds=HOPPER_MEMORY_KINDS, gemm_half=HOPPER_GEMM_HALF,
)

H800 = GpuNumbers(
    name="h800-sxm", device="NVIDIA H800 SXM 80GB (analytic)",
    peak_bf16=_c(989e12, "FLOP/s", "same die as H100 [spec]"),
    gemm_large=H100.gemm_large, attn_plateau=H100.attn_plateau, attn_kernels=H100.attn_kernels,
    attn_kernel=H100.attn_kernel,
    ar_plateau_intra=_c(190e9, "B/s", "~200 GB/s NVLink per direction -> ~190 busbw [assumption, unmeasured]"),
    p2p_intra=_c(168e9, "B/s", "200 GB/s x H100's P2P efficiency 378/450 [derived]"),
    a2a_intra=_c(168e9 * 370 / 378, "B/s", "H100 a2a/p2p ratio (370/378) [derived]"),
    nic=H100.nic, h2d=H100.h2d, d2h=H100.d2h, hbm=H100.hbm,
    sms=_c(132, "SMs", "H800 SXM5 132 SMs, the H100 SXM5 configuration with reduced NVLink [spec]"),
    gemm_tile_m=H100.gemm_tile_m, gemm_tile_n=H100.gemm_tile_n,
    peak_fp8=H100.peak_fp8, gemm_large_fp8=H100.gemm_large_fp8, memory_kinds=H100.memory_kinds,
    gemm_half=H100.gemm_half,
)

# Blackwell. Published: B200 dense peaks, its bf16 MAMF, its 8-GPU all-reduce (REFERENCE 8.1); GB200 NVL72 rack totals
# (NVIDIA GB200 NVL72 datasheet: 360 PFLOPS FP16/BF16 and 720 PFLOPS FP8 with sparsity, 576 TB/s HBM, 130 TB/s NVLink,
# over 72 GPUs); cuDNN's attention on both (cudnn-frontend's SDPA training benchmark). Not published: fp8 MAMF on
# Blackwell, NVL72 collectives.
_B200_MAMF_FRACTION = 1745 / 2250  # bf16 MAMF / dense peak, B200 [meas: stas00]
# Nobody has published Blackwell's sustained GEMM rates or its fp8 MAMF: both come from Hopper's measured ratios. A
# training step's GEMMs run at 0.85 of the MAMF (the H200's measured medians of >= 1 ms GEMMs, both dtypes), and
# Hopper's fp8 MAMF is a smaller fraction of its fp8 peak than the bf16 MAMF of its bf16 peak (1,453.4 / 1,979 over
# 794.5 / 989 = 0.91) [assumption: Blackwell as Hopper]. Before 2026-12-05 the MAMF fraction stood for both: the
# Megatron-Bridge B200 / GB200 rows came out 19-28% fast.
HOPPER_MAMF_BF16, HOPPER_MAMF_FP8 = 794.5e12, 1453.4e12  # H100 SXM [meas: stas00 ml-engineering]
_FP8_MAMF_FRACTION_X = (HOPPER_MAMF_FP8 / 1979e12) / (HOPPER_MAMF_BF16 / 989e12)


def _blackwell_gemm(gpu: str, peak_bf16: float, peak_fp8: float, mamf: str) -> tuple[Const, Const]:
    """(bf16, fp8) sustained large-GEMM rates: the B200's bf16 MAMF fraction of the peak, fp8's scaled as Hopper's,
    both at Hopper's sustained / MAMF ratios."""
    bf16_x = HOPPER_GEMM_SUSTAINED.value / HOPPER_MAMF_BF16
    fp8_x = HOPPER_GEMM_SUSTAINED_FP8.value / HOPPER_MAMF_FP8
    why = "[assumption: Blackwell's sustained / MAMF and fp8 / bf16 MAMF fractions as measured on Hopper]"
    return (_c(peak_bf16 * _B200_MAMF_FRACTION * bf16_x, "FLOP/s", f"{gpu} BF16 peak x {mamf} x the H200's sustained "
               f"/ MAMF {bf16_x:.3f} (673.3 / 794.5) {why}"),
            _c(peak_fp8 * _B200_MAMF_FRACTION * _FP8_MAMF_FRACTION_X * fp8_x, "FLOP/s", f"{gpu} FP8 peak x {mamf} x "
               f"Hopper's fp8 / bf16 MAMF fraction {_FP8_MAMF_FRACTION_X:.3f} x the H200's sustained / MAMF "
               f"{fp8_x:.3f} (1,226.3 / 1,453.4) {why}"))


_B200_GEMM = _blackwell_gemm("B200", 2250e12, 4500e12, "its BF16 MAMF fraction 1745/2250 [meas: stas00]")
_GB200_GEMM = _blackwell_gemm("GB200", 360e15 / 2 / 72, 720e15 / 2 / 72, "the B200's BF16 MAMF fraction 1745/2250 "
                              "[meas: stas00; assumption: unmeasured on GB200]")
NVLINK5 = 900e9  # NVLink5 per GPU per direction (1.8 TB/s bidirectional) [spec: B200 and GB200 NVL72 datasheets]
_NVLINK4_P2P_EFF = 378 / 450  # H100 P2P achieved / NVLink4 spec (REFERENCE 8.1)


_CUDNN_FE_SDPA = ("[NVIDIA/cudnn-frontend benchmark/sdpa_benchmark_training/artifacts/"
                  "sdpa_bf16_benchmark_results_NVIDIA_{gpu}.csv: batch 1, 128 query / 8 KV heads, hd128, causal, "
                  "TFLOP/s with causal halved; {stack}]")
_CUDNN_FE_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)  # the benchmark's lengths from 4K (shorter: batch 1
# calls too small for the tables' >= 16K-token calls)


def fit_saturation(lengths: tuple[int, ...], tflops: tuple[float, ...]) -> tuple[float, float]:
    """(plateau TFLOP/s, s_half tokens) of rate(s) = plateau·s/(s + s_half) with the least squared log error over the
    points: s_half on a log grid, the plateau in closed form for each."""
    s, r = np.asarray(lengths, float), np.log(np.asarray(tflops, float))

    def log_plateau(h: float) -> float:  # the best log plateau for this s_half
        return float(np.mean(r - np.log(s / (s + h))))

    h = min(np.geomspace(50, 50000, 2001), key=lambda h: np.sum((r - log_plateau(h) - np.log(s / (s + h))) ** 2))
    return float(np.exp(log_plateau(h))), float(h)


def _blackwell_attention(gpu: str, peak_flops: float, fwd_causal: tuple[float, ...], bwd: tuple[float, ...],
                         stack: str) -> tuple[dict[str, Const], dict[str, Const]]:
    """(plateaus as fractions of the bf16 peak, s_half) of cuDNN's attention (what Transformer Engine runs on
    Blackwell) fitted to cudnn-frontend's training benchmark from 4K to 128K (`fit_saturation`); the benchmark times
    causal attention only: non-causal forward at FA3's H100 plateau ratio 648 / 616 and S_HALF ratio 200 / 550."""
    src = _CUDNN_FE_SDPA.format(gpu=gpu, stack=stack)
    plateau, s_half = {}, {}
    for key, what, rates in (("fwd_causal", "causal forward", fwd_causal), ("bwd", "backward", bwd)):
        p, h = fit_saturation(_CUDNN_FE_LENGTHS, rates)
        worst = max(abs(p * s / (s + h) / r - 1) for s, r in zip(_CUDNN_FE_LENGTHS, rates))
        fit = (f"{gpu} cuDNN {what} {', '.join(f'{r:g}' for r in rates)} TFLOP/s at 4K-128K fitted to "
               f"plateau·s/(s + s_half), within {worst:.0%} {src}")
        plateau[key] = _c(p * 1e12 / peak_flops, "x", f"plateau {p:.0f} TFLOP/s: {fit}")
        s_half[key] = _c(h, "tokens", f"s_half {h:.0f}: {fit}")
    plateau["fwd_noncausal"] = _c(plateau["fwd_causal"].value * 648 / 616, "x", f"{gpu}: the causal forward plateau x "
                                  f"FA3's H100 non-causal / causal 648 / 616 [assumption]")
    s_half["fwd_noncausal"] = _c(s_half["fwd_causal"].value * 200 / 550, "tokens", f"{gpu}: the causal forward s_half "
                                 "x S_HALF's non-causal / causal 200 / 550 [assumption]")
    return plateau, s_half


_B200_ATTN = _blackwell_attention("B200", 2250e12, (855.7, 1171.3, 1332.4, 1419.0, 1382.3, 1355.4),
                                  (701.3, 942.5, 1074.8, 1108.7, 1073.1, 1047.8),
                                  "PyTorch's cuDNN SDPA, cuDNN 9.13, torch 2.9 of the NGC 25.09 container")
_GB200_ATTN = _blackwell_attention("GB200", 360e15 / 2 / 72, (1386, 1584, 1668, 1681, 1573, 1467),
                                   (1054, 1211, 1304, 1348, 1229, 1188),
                                   "cudnn-frontend 1.16, cuDNN 9.17, torch of the NGC 25.11 container")


_TILE_BLACKWELL = "Hopper's 128x256 output tile [assumption: no published Blackwell cuBLAS tile]"
B200 = GpuNumbers(
    name="b200", device="NVIDIA B200 SXM 180GB (analytic)",
    peak_bf16=_c(2250e12, "FLOP/s", "B200 (1000 W) dense BF16 [spec, REFERENCE 8.1]"),
    gemm_large=_B200_GEMM[0],
    attn_plateau=_B200_ATTN[0], attn_s_half=_B200_ATTN[1],
    ar_plateau_intra=_c(845.7e9, "B/s", "8xB200 all-reduce busbw at 16 GiB [meas: stas00, AWS P6-B200, REFERENCE 8.1]"),
    p2p_intra=_c(NVLINK5 * _NVLINK4_P2P_EFF, "B/s", "NVLink5 900 GB/s per direction [spec] x H100's P2P efficiency "
                 "378/450 [derived]"),
    a2a_intra=_c(NVLINK5 * _NVLINK4_P2P_EFF * 370 / 378, "B/s", "H100 a2a/p2p ratio (370/378) [derived]"),
    nic=_c(50e9, "B/s", "DGX B200: 8x 400 Gb/s ConnectX-7, one per GPU [spec]"),
    h2d=_c(H100.h2d.value, "B/s", "H100's H2D: the same PCIe Gen5 host path on HGX [assumption]"),
    d2h=_c(H100.d2h.value, "B/s", "H100's D2H: the same PCIe Gen5 host path on HGX [assumption]"),
    hbm=_hbm(8.0e12, "B200"),
    sms=_c(148, "SMs", "B200 148 SMs (SM 10.0) [code search: device queries in B200 benchmark repositories]"),
    gemm_tile_m=_c(128, "elements", _TILE_BLACKWELL), gemm_tile_n=_c(256, "elements", _TILE_BLACKWELL),
    peak_fp8=_c(4500e12, "FLOP/s", "B200 dense FP8 [spec, REFERENCE 8.1]"),
    gemm_large_fp8=_B200_GEMM[1], memory_kinds=KINDS_AS_HOPPER,
)

_GB200_RACK = "NVIDIA GB200 NVL72 datasheet"
# GB200: the rates as derived from the rack's peaks, then the sustained fraction fitted to the Megatron-Bridge GB200
# runs (the design set): 0.864, which puts its GEMMs at the B200's rate (0.864 x 2.5 = 2.16 of the B200's 2.25
# PFLOP/s peak, the B200 set's own fit 0.997): the rack's higher per-GPU peak does not show in the runs.
GB200_STATED = GpuNumbers(
    name="gb200", device="NVIDIA GB200 NVL72 (analytic)",
    peak_bf16=_c(360e15 / 2 / 72, "FLOP/s", f"{_GB200_RACK}: 360 PFLOPS FP16/BF16 with sparsity per 72 GPUs -> 2.5 "
                 "dense per GPU [spec, derived]"),
    gemm_large=_GB200_GEMM[0],
    attn_plateau=_GB200_ATTN[0], attn_s_half=_GB200_ATTN[1],
    ar_plateau_intra=_c(B200.ar_plateau_intra.value, "B/s", "8xB200 all-reduce busbw [meas: stas00], the same NVLink5 "
                        "per GPU, held for every group inside the 72-GPU domain [assumption: NVL72 unmeasured]"),
    p2p_intra=B200.p2p_intra, a2a_intra=B200.a2a_intra,
    nic=_c(50e9, "B/s", "one 400 Gb/s ConnectX-7 per GPU between racks [assumption]"),
    h2d=_c(0.8 * 900e9 / 4, "B/s", "NVLink-C2C 900 GB/s bidirectional per Grace and its 2 GPUs [spec] -> 225 GB/s "
           "per GPU per direction [derived] x 0.8 achieved [assumption]"),
    d2h=_c(0.8 * 900e9 / 4, "B/s", "as h2d: NVLink-C2C 225 GB/s per GPU per direction [derived] x 0.8 [assumption]"),
    hbm=_hbm(576e12 / 72, "GB200 (576 TB/s per 72 GPUs)"),
    sms=_c(148, "SMs", "B200's 148 SMs [assumption: the same Blackwell GPU]"),
    gemm_tile_m=B200.gemm_tile_m, gemm_tile_n=B200.gemm_tile_n,
    peak_fp8=_c(720e15 / 2 / 72, "FLOP/s", f"{_GB200_RACK}: 720 PFLOPS FP8 with sparsity per 72 GPUs -> 5.0 dense "
                "per GPU [spec, derived]"),
    gemm_large_fp8=_GB200_GEMM[1], memory_kinds=KINDS_AS_HOPPER,
    domain_gpus=_c(72, "GPUs", f"{_GB200_RACK}: 72 GPUs on one NVLink Switch System, 130 TB/s [spec]"),
)
GB200_GEMM_X = _c(0.864, "x", "sustained fraction of the derived rates fitted to the design set "
                  "megatron_bridge_gb200_2025 (its 4 rows) [fit: planner.studies.design_fit, python -m "
                  "bench.design_fit]")
GB200 = with_gemm_rate_x(GB200_STATED, GB200_GEMM_X)

GPUS: dict[str, GpuNumbers] = {g.name: g for g in (H100, A100, A100_OPA, H200, H800, B200, GB200)}

SIZES_BYTES = [KiB * 4**i for i in range(13)]  # 1 KiB .. 16 GiB
ATTN_LENGTHS = [128 * 2**i for i in range(15)]  # 128 .. 2M tokens
GEMM_EDGES = [128 * 2**i for i in range(9)]  # 128 .. 32K


def group_sizes(domain_gpus: int) -> tuple[list[int], list[int]]:
    """Collective group sizes of the tables: inside one domain (powers of two, then the whole domain), and
    across 2 .. 2048 whole domains (8-GPU domains: 2 .. 8 and 16 .. 16384 GPUs)."""
    intra = sorted({2**i for i in range(1, domain_gpus.bit_length()) if 2**i < domain_gpus} | {domain_gpus})
    return intra, [domain_gpus * 2**i for i in range(1, 12)]



def concurrent_groups(domain_gpus: int) -> list[int]:
    """Interleaved groups per domain the inter-domain tables are given for: every TP degree a domain allows."""
    return [c for c in range(1, domain_gpus + 1) if domain_gpus % c == 0]


def _shape(points: list[tuple[float, float]], sizes: np.ndarray, norm: float) -> np.ndarray:
    """Fraction of plateau busbw vs size; below the first point busbw falls in proportion to size."""
    xs = np.array([p[0] for p in points], float)
    ys = np.array([p[1] for p in points], float) / norm
    out = np.exp(np.interp(np.log(sizes), np.log(xs), np.log(ys)))
    return np.where(sizes < xs[0], ys[0] * sizes / xs[0], out)


def _kernel_time_x(g: GpuNumbers) -> dict[str, Const]:
    """Each published kernel's causal attention time over the table kernel's: `attn_kernel_time_x_<kernel>_<dir>` at
    long lengths (the plateaus') and, where the paper gives the kernels' rates per length (Hopper),
    `..._<dir>_at_<tokens>` at each of ATTN_PAPER_LENGTHS (Profile.attention_kernel_time_x interpolates them)."""
    out: dict[str, Const] = {}
    series = _HOPPER_ATTENTION_TFLOPS if g.attn_kernels is HOPPER_ATTENTION else {}  # measured on an H100 only
    for kernel, plateau in (g.attn_kernels or {g.attn_kernel: g.attn_plateau}).items():
        for direction, key in (("fwd", "fwd_causal"), ("bwd", "bwd")):
            if kernel == g.attn_kernel:
                out[f"attn_kernel_time_x_{kernel}_{direction}"] = _c(1.0, "x", f"{kernel}: the table's own")
                continue
            own, other = g.attn_plateau[key], plateau[key]
            out[f"attn_kernel_time_x_{kernel}_{direction}"] = _c(
                own.value / other.value, "x", f"{g.attn_kernel} (the table's) over {kernel}, causal {direction}: "
                f"{own.source}; {other.source}")
            if kernel in series and g.attn_kernel in series:
                name, own_name = series[kernel][0], series[g.attn_kernel][0]
                for s, mine, theirs in zip(ATTN_PAPER_LENGTHS, series[g.attn_kernel][1][key], series[kernel][1][key]):
                    out[f"attn_kernel_time_x_{kernel}_{direction}_at_{s}"] = _c(
                        mine / theirs, "x", f"{own_name} {mine} over {name} {theirs} TFLOP/s, {_ATTN_WHAT[key]} at "
                        f"{s} tokens, hd128, H100 SXM5 {_FA3_PAPER}")
    return out


def build(g: GpuNumbers) -> Profile:
    """The four tables for one GPU from its published numbers."""
    consts: dict[str, Const] = {
        "peak_bf16_flops": g.peak_bf16, "gemm_large_flops": g.gemm_large, "ar_plateau_intra": g.ar_plateau_intra,
        "p2p_intra": g.p2p_intra, "a2a_intra": g.a2a_intra, "nic": g.nic, "h2d": g.h2d, "d2h": g.d2h,
        "gemm_half_flops": g.gemm_half or GEMM_HALF_FLOPS_AT_989T, "gemm_floor": GEMM_FLOOR,
        "nic_eff": NIC_EFF, "p2p_nic_eff": P2P_NIC_EFF, "floor_intra": FLOOR_INTRA, "floor_p2p": FLOOR_P2P,
        "floor_inter_256": FLOOR_INTER_256, "floor_inter_p2p": FLOOR_INTER_P2P, "host_copy_floor": HOST_COPY_FLOOR,
        "pageable_factor": PAGEABLE_FACTOR, "ar_shape": AR_SHAPE, "inter_shape": INTER_SHAPE,
        "hbm": g.hbm, "hbm_eff": HBM_EFF, "kernel_floor": KERNEL_FLOOR,
        "gemm_sms": g.sms, "gemm_tile_m": g.gemm_tile_m, "gemm_tile_n": g.gemm_tile_n,
    }
    consts.update({f"attn_plateau_{k}": v for k, v in g.attn_plateau.items()})
    if g.attn_kernel is not None:  # a kernel's attention time over the table's (Profile.attention_kernel_time_x)
        consts.update(_kernel_time_x(g))
    s_half = g.attn_s_half or S_HALF
    consts.update({f"attn_s_half_{k}": v for k, v in s_half.items()})
    hd64 = _hd64_x(g)
    consts.update({f"attn_hd64_x_{k}": v for k, v in hd64.items()})
    gemm_rates = [("bf16", g.gemm_large, g.peak_bf16)]
    if g.peak_fp8 is not None and g.gemm_large_fp8 is not None:
        consts.update({"peak_fp8_flops": g.peak_fp8, "gemm_large_fp8_flops": g.gemm_large_fp8})
        gemm_rates.append(("fp8", g.gemm_large_fp8, g.peak_fp8))
    if g.domain_gpus is not None:
        consts["nvlink_domain_gpus"] = g.domain_gpus
    consts.update({f"memory_kind_{k}": v for k, v in (g.memory_kinds or {}).items()})

    # GEMM, per dtype: generic cube-ish grid; time = max(floor, flops / (achieved * x/(x + x_half))), x_half scaled
    # with the dtype's peak (the same time to half efficiency).
    rows = []
    for dtype, large, peak in gemm_rates:
        half = consts["gemm_half_flops"].value * peak.value / 989e12
        for m in GEMM_EDGES:
            for n, k in ((m, m), (4096, 4096), (8192, 8192)):
                fl = 2.0 * m * n * k
                rate = large.value * fl / (fl + half)
                rows.append((m, n, k, dtype, max(GEMM_FLOOR.value, fl / rate)))
    gemm = pd.DataFrame(rows, columns=["m", "n", "k", "dtype", "time_s"])

    # Attention: rate = peak * plateau * s/(s + s_half); calls hold >= 16K tokens like the FA3 runs.
    rows = []
    for hd in (64, 128):
        for key, direction, causal in (("fwd_noncausal", "fwd", False), ("fwd_causal", "fwd", True),
                                       ("bwd", "bwd", True), ("bwd", "bwd", False)):
            plateau = g.attn_plateau[key].value * (hd64[key].value if hd == 64 else 1.0)
            for s in ATTN_LENGTHS:
                docs = max(1, 16384 // s)
                rate = g.peak_bf16.value * plateau * s / (s + s_half[key].value)
                fl = float(attention_flops(s, 32, hd, causal, direction)) * docs
                rows.append((direction, causal, 32, 8, hd, s, docs, "bf16", fl / rate))
    attention = pd.DataFrame(rows, columns=["direction", "causal", "heads", "kv_heads", "head_dim", "doc_len",
                                            "docs", "dtype", "time_s"])

    # Collectives.
    sizes = np.array(SIZES_BYTES, float)
    rows = []
    ar_shape = _shape(_AR_SHAPE_POINTS, sizes, 465.9)
    nic_eff = g.nic.value * NIC_EFF.value
    gpn = HGX_DOMAIN_GPUS if g.domain_gpus is None else int(g.domain_gpus.value)  # "intra": inside one domain
    intra_groups, inter_groups = group_sizes(gpn)
    for op in ("all_reduce", "all_gather", "reduce_scatter"):
        for n in intra_groups:
            bw = g.ar_plateau_intra.value * ar_shape
            t = np.maximum(FLOOR_INTRA.value, sizes * bus_factor(op, n) / bw)
            rows += [(op, "intra", n, 1, int(s), float(x)) for s, x in zip(sizes, t)]
        # Across k domains, hierarchical: a domain moves ~F(k)·S through the NICs of its m members of the group;
        # c = gpn/m interleaved groups (one per TP rank) run at once, each on its own members' NICs. The size
        # shape (measured on whole nodes) is taken at the bytes per NIC: S/m reaches the plateau at S·gpn/m.
        for c in concurrent_groups(gpn):
            m = gpn // c
            inter_shape = _shape(_INTER_SHAPE_POINTS, sizes * gpn / m, 1.0)
            for k in (n // gpn for n in inter_groups):
                n = k * m
                plateau = min(g.ar_plateau_intra.value, bus_factor(op, n) * m * nic_eff / bus_factor(op, k))
                floor = FLOOR_INTRA.value + (FLOOR_INTER_256.value - FLOOR_INTRA.value) * np.log2(k) / 5
                t = np.maximum(floor, sizes * bus_factor(op, n) / (plateau * inter_shape))
                rows += [(op, "inter", n, c, int(s), float(x)) for s, x in zip(sizes, t)]
    for n in intra_groups:  # alpha-beta for all-to-all and P2P
        t = FLOOR_P2P.value + sizes * bus_factor("all_to_all", n) / g.a2a_intra.value
        rows += [("all_to_all", "intra", n, 1, int(s), float(x)) for s, x in zip(sizes, t)]
    for n in inter_groups:  # inter-node all-to-all: the NIC carries the (k-1)/k of the bytes bound for other domains
        # while NVLink moves the rest, so busbw = one NIC's rate x k/(k - 1) over k domains: 2x on 2, ~1x on many
        # [NCCL's S. Jeaugey, nccl-tests #130 and #267: alltoall cannot aggregate several NICs]
        k = n // gpn
        busbw = g.nic.value * P2P_NIC_EFF.value * k / (k - 1)
        t = FLOOR_INTER_P2P.value + sizes * bus_factor("all_to_all", n) / busbw
        rows += [("all_to_all", "inter", n, 1, int(s), float(x)) for s, x in zip(sizes, t)]
    t = FLOOR_P2P.value + sizes / g.p2p_intra.value
    rows += [("send_recv", "intra", 2, 1, int(s), float(x)) for s, x in zip(sizes, t)]
    t = FLOOR_INTER_P2P.value + sizes / (g.nic.value * P2P_NIC_EFF.value)
    rows += [("send_recv", "inter", 2, 1, int(s), float(x)) for s, x in zip(sizes, t)]
    collective = pd.DataFrame(rows, columns=["op", "scope", "group_size", "concurrent_groups", "bytes", "time_s"])

    rows = []
    for direction, bw in (("h2d", g.h2d.value), ("d2h", g.d2h.value)):
        for pinned in (True, False):
            eff = bw * (1.0 if pinned else PAGEABLE_FACTOR.value)
            rows += [(direction, pinned, int(s), HOST_COPY_FLOOR.value + s / eff) for s in sizes]
    host_copy = pd.DataFrame(rows, columns=["direction", "pinned", "bytes", "time_s"])

    # Memory-bound kernels: launch floor + bytes at the achievable HBM bandwidth (alpha-beta).
    memory = pd.DataFrame([(int(s), KERNEL_FLOOR.value + s / g.hbm.value) for s in sizes], columns=["bytes", "time_s"])

    fp = Fingerprint(name=f"{g.name}.analytic", device=g.device, source="analytic", created=ANALYTIC_DATE,
                     versions={"meshplan.profiles.analytic": "1"},
                     notes="Built from datasheet peaks and published measurements (REFERENCE.md §8); "
                           "every constant lists its source. Calibrate against a measured profile.")
    return Profile(fingerprint=fp, tables={"gemm": gemm, "attention": attention, "collective": collective,
                                           "host_copy": host_copy, "memory": memory},
                   constants={k: {"value": v.value, "unit": v.unit, "source": v.source} for k, v in consts.items()})


def write_all(folder: Path) -> list[Path]:
    return [build(g).save(folder / f"{g.name}.analytic.json") for g in GPUS.values()]


if __name__ == "__main__":
    for p in write_all(Path(__file__).parent / "data"):
        print(p)

"""Profile: measured or analytic lookup tables of what the hardware does, with a fingerprint.

Five tables (pandas DataFrames, one row per measurement):

- ``gemm``:       m, n, k, dtype, time_s                     (C[m,n] = A[m,k] @ B[k,n])
- ``attention``:  direction ("fwd"/"bwd"), causal, heads, kv_heads, head_dim, doc_len,
                  docs (documents per kernel call), dtype, time_s
                  [+ optional layout: when present, lookups use only "varlen" rows]
- ``collective``: op, scope ("intra"/"inter"), group_size, concurrent_groups, bytes, time_s
                  (bytes is nccl-tests' S: all-gather output, reduce-scatter input,
                  all-to-all per-rank send buffer, all-reduce buffer, send/recv message;
                  concurrent_groups c: c groups run the op at once, interleaved (group j holds ranks
                  j, j + c, ...), as the DP groups of a TP-c mesh do: across domains they share the NICs)
- ``host_copy``:  direction ("h2d"/"d2h"/"memcpy"), pinned, bytes, time_s
- ``memory``:     bytes, time_s                              (a memory-bound elementwise kernel: bytes read
                  + written in device memory; the smallest size's time is the kernel-launch floor)

Interpolation is piecewise-linear in log-log space. Extrapolation, by table:
- time-vs-size curves (GEMM, host copies, memory): below the grid the smallest point's time is a
  floor (launch latency); above it time grows in proportion to size (last throughput held).
- rate-vs-size curves (attention FLOP/s vs document length, collective busbw vs bytes): the
  rate is held flat beyond either end (busbw below the grid is then optimistic only for messages
  under the smallest measured size, which is 1 KiB on every shipped profile). Asked for whole documents (`per_document`), a document shorter than the attention grid
  costs the grid's smallest length's time, as the smallest GEMM's time is a floor: a call's fixed
  cost (CPU: one SDPA call per document) or a GPU kernel's smallest tile (FlashAttention computes a
  128-row block whatever fraction of it a short document fills).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import pandas as pd

from profiles.typed_json import Range, Reader

SCHEMA_VERSION = 1


class ProfileError(ValueError):
    """A profile file is missing, corrupt, or lacks a table the cost model needs."""


COLLECTIVE_OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")

_COUNT = (int, Range(lo=0, lo_open=True))  # sizes, counts, bytes: integers > 0
_TIME = (float, Range(lo=0, lo_open=True))  # seconds: finite and > 0
# The required columns of each table, in order, with the type (and range) of their values; tables
# may carry more columns (layout, impl, ...), which are kept as they are.
TABLE_SCHEMA: dict[str, dict[str, tuple[Any, Range | None]]] = {
    "gemm": {"m": _COUNT, "n": _COUNT, "k": _COUNT, "dtype": (str, None), "time_s": _TIME},
    "attention": {"direction": (Literal["fwd", "bwd"], None), "causal": (bool, None), "heads": _COUNT,
                  "kv_heads": _COUNT, "head_dim": _COUNT, "doc_len": _COUNT, "docs": _COUNT, "dtype": (str, None),
                  "time_s": _TIME},
    "collective": {"op": (Literal[COLLECTIVE_OPS], None), "scope": (Literal["intra", "inter"], None),
                   "group_size": _COUNT, "concurrent_groups": _COUNT, "bytes": _COUNT, "time_s": _TIME},
    "host_copy": {"direction": (Literal["h2d", "d2h", "memcpy"], None), "pinned": (bool, None), "bytes": _COUNT,
                  "time_s": _TIME},
    "memory": {"bytes": _COUNT, "time_s": _TIME},
}
# Tables added after schema 1 are written only when they hold rows, so a file saved before they existed keeps
# its sha256 (it loads with the table empty and is told to measure it).
ADDED_TABLES = ("memory",)
TABLE_COLUMNS: dict[str, list[str]] = {name: list(cols) for name, cols in TABLE_SCHEMA.items()}
COST_MODEL_TABLES = ("gemm", "attention", "collective", "host_copy", "memory")  # a CostModel needs rows in each


def bus_factor(op: str, n: int) -> float:
    """nccl-tests busbw/algbw factor F for a group of n ranks (REFERENCE 7.6)."""
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    if op == "send_recv":
        return 1.0
    raise ProfileError(f"unknown collective op {op!r}; one of {', '.join(COLLECTIVE_OPS)}")


def attention_flops(doc_len: np.ndarray | float, heads: int, head_dim: int, causal: bool,
                    direction: str) -> np.ndarray:
    """FLOPs of the attention core for one document: 4·s²·n_q·d_h forward (QKᵀ and PV), halved when
    causal; backward 2.5× forward (FlashAttention's convention, REFERENCE 7.1)."""
    s = np.asarray(doc_len, dtype=float)
    f = 4.0 * s * s * heads * head_dim * (0.5 if causal else 1.0)
    return f * (2.5 if direction == "bwd" else 1.0)


def loglog_interp(x: np.ndarray | float, xs: np.ndarray, ys: np.ndarray, *, below: str = "clamp",
                  above: str = "clamp") -> np.ndarray:
    """Piecewise-linear interpolation of log(y) over log(x). Outside [xs[0], xs[-1]]:
    'clamp' holds the end value, 'proportional' scales y with x (constant y/x)."""
    xs = np.asarray(xs, dtype=float)
    ys = np.asarray(ys, dtype=float)
    xq = np.maximum(np.asarray(x, dtype=float), 1e-300)
    if len(xs) == 1:
        out = np.full_like(xq, ys[0])
    else:
        out = np.exp(np.interp(np.log(xq), np.log(xs), np.log(ys)))
    if above == "proportional":
        hi = xq > xs[-1]
        out = np.where(hi, ys[-1] * xq / xs[-1], out)
    if below == "proportional":
        lo = xq < xs[0]
        out = np.where(lo, ys[0] * xq / xs[0], out)
    return out


# Below one wave of output tiles the GEMM library splits k across more blocks (cuBLAS split-K, CUTLASS's stream-K
# on Hopper) to fill the SMs; a slice keeps at least this much of k [assumption]. Fitted with it on the H200's
# measured GEMMs, the analytic tables' small shapes fall from 1.3-4.2x too slow to within 16% (docs/COSTMODEL.md)
SPLIT_K_MIN_K = 256


def quantised_gemm_flops(m: np.ndarray | float, n: int, k: np.ndarray | int, sms: float, tile_m: float, tile_n: float
                         ) -> np.ndarray:
    """FLOPs an (m×k)·(k×n) GEMM costs on `sms` SMs: whole output tiles (tile quantisation) run in whole waves of
    one tile per SM (wave quantisation), with the tile or its transpose, whichever pads less; under one wave, k
    is split into up to SMs/tiles slices of at least SPLIT_K_MIN_K, whose waves are counted the same way. `m` or
    `k` may be an array (a weight gradient's k is the tokens)."""
    m_arr, k = np.broadcast_arrays(np.asarray(m, dtype=float), np.asarray(k, dtype=float))
    flops = np.full_like(m_arr, np.inf)
    for a, b in ((tile_m, tile_n), (tile_n, tile_m)):  # a along m, b along n
        tiles = np.ceil(m_arr / a) * math.ceil(n / b)
        splits = np.where(tiles < sms, np.maximum(1.0, np.minimum(sms // tiles, k // SPLIT_K_MIN_K)), 1.0)
        flops = np.minimum(flops, np.ceil(tiles * splits / sms) * sms * a * b * 2.0 * k / splits)
    return flops


# How each kind of lookup curve (Profile._curve's key[0]) follows its table's times: (table, power of the
# table's time factor its y values take). Times scale with it, rates (FLOP/s, busbw) inversely; the collectives'
# CPU is a column of its own that with_times_scaled leaves as it is.
_CURVE_SCALING: dict[str, tuple[str, int]] = {
    "gemm_exact": ("gemm", 1), "gemm_generic": ("gemm", 1), "attn": ("attention", -1),
    "collective": ("collective", -1), "collective_cpu": ("collective", 0), "host_copy": ("host_copy", 1),
    "memory": ("memory", 1)}


def _rescaled(curve: Any, factor: float) -> Any:
    """A lookup curve ((x, y), {group size: (x, y)} or None) with its y values times `factor` (a median, a running
    maximum and a log-log blend of them all commute with a positive factor)."""
    if curve is None or factor == 1.0:
        return curve
    if isinstance(curve, dict):
        return {g: _rescaled(c, factor) for g, c in curve.items()}
    xs, ys = curve
    return xs, _read_only((ys * factor,))[0]


def _read_only(curve: Any) -> Any:
    """A cached lookup curve with its arrays made read-only: profiles made by with_times_scaled share them."""
    if isinstance(curve, dict):
        for c in curve.values():
            _read_only(c)
    elif curve is not None:
        for a in curve:
            a.setflags(write=False)
    return curve


def _series(df: pd.DataFrame, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique x with the median y per x (repeated measurements collapse)."""
    g = df.groupby(x, sort=True)[y].median()
    return g.index.to_numpy(dtype=float), g.to_numpy(dtype=float)


@dataclass(frozen=True)
class Fingerprint:
    """Where a profile's numbers come from."""

    name: str  # profile name, e.g. "h100-sxm.analytic"
    device: str  # device the numbers describe, e.g. "NVIDIA H100 80GB HBM3" or "cpu: <model>"
    source: Literal["measured", "analytic"]  # how the numbers were obtained
    created: str  # ISO date (analytic: date of the sources' snapshot)
    versions: dict[str, str] = field(default_factory=dict)  # software versions (torch, cuda, nccl, ...)
    notes: str = ""  # free text: what was measured how, caveats
    sha256: str = ""  # hash of the canonical JSON content (filled on save / load)


@dataclass
class Profile:
    """Tables + fingerprint + fitted coefficients, with the interpolation the cost model uses. Lookups cache the
    curves they build from the tables (`_curve`), so the tables are read-only once a profile is priced: a changed
    table is a new profile (`with_times_scaled`, or the constructor)."""

    fingerprint: Fingerprint
    tables: dict[str, pd.DataFrame]
    constants: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"value", "unit", "source"}
    fits: dict[str, dict[str, float]] = field(default_factory=dict)  # e.g. per-layer T(s) per model
    # The file load_profile read it from (absolute; None: shipped or built in memory). Not content:
    # plans record it so `simulate` finds the same profile again.
    path: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.fingerprint.source not in ("measured", "analytic"):
            raise ProfileError(f"profile {self.fingerprint.name!r}: source must be 'measured' or 'analytic'")
        for name, cols in TABLE_COLUMNS.items():
            if name not in self.tables:
                self.tables[name] = pd.DataFrame(columns=cols)
            missing = [c for c in cols if c not in self.tables[name].columns]
            if missing:
                raise ProfileError(f"profile {self.fingerprint.name!r}: table {name} lacks columns {missing}")
            bad = self.tables[name]["time_s"].astype(float)
            if len(bad) and not (np.isfinite(bad).all() and (bad > 0).all()):
                raise ProfileError(f"profile {self.fingerprint.name!r}: table {name} has non-positive "
                                   "or non-finite times")

    # ---- serialisation ----------------------------------------------------------------------
    def content_dict(self) -> dict[str, Any]:
        """Everything but the sha256: the hashed content."""
        fp = asdict(self.fingerprint)
        fp.pop("sha256")
        tables = {}
        for name, cols in TABLE_COLUMNS.items():
            df = self.tables[name]
            if name in ADDED_TABLES and df.empty:
                continue
            extra = [c for c in df.columns if c not in cols]
            allc = cols + extra
            tables[name] = {"columns": allc,
                            "rows": [[_py(v) for v in row] for row in df[allc].itertuples(index=False)]}
        return {"schema_version": SCHEMA_VERSION, "fingerprint": fp, "constants": self.constants,
                "fits": self.fits, "tables": tables}

    def compute_sha256(self) -> str:
        blob = json.dumps(self.content_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_json(self) -> str:
        d = self.content_dict()
        d["fingerprint"]["sha256"] = self.compute_sha256()
        return json.dumps(d, indent=1, sort_keys=True) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename): a crash never leaves a half-written profile."""
        path = Path(path)
        text = self.to_json()
        self.fingerprint = Fingerprint(**{**asdict(self.fingerprint), "sha256": self.compute_sha256()})
        atomic_write_text(path, text)
        return path

    @classmethod
    def from_dict(cls, d: Any, origin: str = "profile") -> "Profile":
        """A profile from its JSON object: every field typed and every table cell checked against
        TABLE_SCHEMA, each error one line naming `origin`, the table and the column."""
        if not isinstance(d, dict) or "fingerprint" not in d or "tables" not in d:
            raise ProfileError(f"{origin}: not a meshplan profile (needs 'fingerprint' and 'tables')")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ProfileError(f"{origin}: schema_version {d.get('schema_version')!r} not supported "
                               f"(expected {SCHEMA_VERSION}); re-create it with `meshplan profile`")
        read = Reader(origin, ProfileError)
        doc = read.build(_ProfileJSON, d)
        unknown = sorted(set(doc.tables) - set(TABLE_SCHEMA))
        if unknown:
            raise ProfileError(f"{origin}: tables: unknown table(s) {unknown}; known: {list(TABLE_SCHEMA)}")
        tables = {name: _table_frame(read, name, t) for name, t in doc.tables.items()}
        fp = doc.fingerprint
        prof = cls(fingerprint=fp, tables=tables, constants=d.get("constants", {}), fits=d.get("fits", {}))
        sha = prof.compute_sha256()
        if fp.sha256 and fp.sha256 != sha:
            raise ProfileError(f"{origin}: sha256 mismatch (file edited or corrupt); re-create it with "
                               "`meshplan profile`")
        prof.fingerprint = Fingerprint(**{**asdict(fp), "sha256": sha})
        return prof

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        return cls.from_dict(read_json(path, "profile", ProfileError), origin=str(path))

    def require_tables(self, names: tuple[str, ...] = COST_MODEL_TABLES) -> None:
        """Raise unless each named table has rows (a profile measured with `--ops` may lack some)."""
        empty = [n for n in names if self.tables[n].empty]
        if empty:
            where = f" ({self.path})" if self.path else ""
            raise ProfileError(f"profile {self.fingerprint.name!r}{where} has no rows in table(s) {', '.join(empty)}; "
                               f"the cost model needs rows in each of {', '.join(names)}: measure them with "
                               f"`meshplan profile --ops {','.join(empty)}` or use a shipped profile")

    # ---- derived profiles --------------------------------------------------------------------
    def with_times_scaled(self, factors: dict[str, float], **changes: Any) -> "Profile":
        """This profile with each named table's time_s multiplied by its factor (> 0) and `changes` to its other
        fields (fingerprint, constants, fits). Its lookup curves are this profile's, rescaled, rather than rebuilt
        from the tables: a calibration prices hundreds of such profiles, and rebuilding each one's curves cost more
        than pricing the plans with them (docs/BENCHMARKS.md)."""
        bad = {t: f for t, f in factors.items() if t not in TABLE_SCHEMA or not (math.isfinite(f) and f > 0)}
        if bad:
            raise ProfileError(f"profile {self.fingerprint.name!r}: cannot scale tables {bad}: each must be one of "
                               f"{list(TABLE_SCHEMA)} with a finite factor > 0")
        tables = {}
        for t, df in self.tables.items():
            df = df.copy()
            if factors.get(t, 1.0) != 1.0 and len(df):
                df["time_s"] = df["time_s"].astype(float) * factors[t]
            tables[t] = df
        origin, before = self.__dict__.get("_scaled_from", (self, {}))
        own = {k: copy.deepcopy(getattr(self, k)) for k in ("constants", "fits") if k not in changes}  # not shared
        out = replace(self, tables=tables, **own, **changes)
        out.path = None
        out.__dict__["_scaled_from"] = (origin, {t: before.get(t, 1.0) * factors.get(t, 1.0)
                                                 for t in set(before) | set(factors)})
        return out

    def _curve(self, key: tuple, build: Callable[["Profile"], Any]) -> Any:
        """The lookup curve `key` (its first item names its kind in _CURVE_SCALING), built once per profile by
        `build(profile)`; a profile made by with_times_scaled takes its origin's, rescaled."""
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            origin, factors = self.__dict__.get("_scaled_from", (None, {}))
            if origin is None:
                cache[key] = _read_only(build(self))
            else:
                table, power = _CURVE_SCALING[key[0]]
                try:
                    cache[key] = _rescaled(origin._curve(key, build), factors.get(table, 1.0) ** power)
                except ProfileError:  # raised again from this profile's own tables, naming it
                    cache[key] = _read_only(build(self))
        return cache[key]

    # ---- lookups ----------------------------------------------------------------------------
    @property
    def times_gemm_shapes(self) -> bool:
        """Whether the GEMM time follows every shape (the analytic profiles: tile and wave quantisation on the SM
        count, the roofline), so a backward's dgrad and wgrad are timed at their own shapes; a measured table times
        the forward shapes it measured, and the backward is taken as twice them."""
        return all(c in self.constants for c in ("gemm_sms", "gemm_tile_m", "gemm_tile_n"))

    def gemm_time_s(self, m: np.ndarray | float, n: int, k: np.ndarray | int, dtype: str = "bf16",
                    out_bytes: float | None = None) -> np.ndarray:
        """Time of an (m×k)·(k×n) GEMM; `m` or `k` may be an array. Uses the measured series of this exact (n, k)
        when it has two or more m points, else the generic time-vs-FLOPs curve of the dtype.

        A profile carrying `gemm_sms`, `gemm_tile_m` and `gemm_tile_n` (the analytic ones: their curve is the
        best-shape rate, and their (n, k) series are samples of that same curve) always takes the curve at the
        padded problem's FLOPs (quantised_gemm_flops). Measured tables already hold
        their shape losses, so they are looked up as they are. A profile that also carries `hbm` (achievable
        device-memory bandwidth) bounds the time below by the roofline's memory side: reading A and B (1 B an
        element in fp8, 4 in fp32, else 2) and writing C once at `out_bytes` an element (default: 4 in fp32, else 2;
        a weight gradient accumulated into fp32 in the GEMM reads and writes it, 8), what makes QKᵀ of materialised
        attention (k = head_dim) and a large weight's gradient over few rows memory-bound."""
        m_arr, k_arr = np.broadcast_arrays(np.asarray(m, dtype=float), np.asarray(k, dtype=float))
        xs, ys = self._gemm_generic(dtype)  # (cached) raises where the table has no `dtype` rows
        quantise = self.times_gemm_shapes
        if not quantise and np.ndim(k) == 0:  # a measured table's own series of this (n, k)
            exact = self._curve(("gemm_exact", dtype, n, k), lambda p: p._gemm_exact(dtype, n, k))
            if exact is not None:
                return loglog_interp(m_arr, *exact, below="clamp", above="proportional")
        if not quantise:
            return loglog_interp(2.0 * m_arr * n * k_arr, xs, ys, below="clamp", above="proportional")
        sms, tm, tn = (self.constant(c) for c in ("gemm_sms", "gemm_tile_m", "gemm_tile_n"))
        t = loglog_interp(quantised_gemm_flops(m_arr, n, k_arr, sms, tm, tn), xs, ys, below="clamp",
                          above="proportional")
        if "hbm" in self.constants:
            elem = {"fp32": 4.0, "fp8": 1.0}.get(dtype, 2.0)
            out = out_bytes if out_bytes is not None else (4.0 if dtype == "fp32" else 2.0)
            t = np.maximum(t, ((m_arr * k_arr + k_arr * n) * elem + m_arr * n * out) / self.constant("hbm"))
        return t

    def _gemm_exact(self, dtype: str, n: int, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The table's time-vs-m series of this exact (n, k), or None where it has fewer than two m points."""
        df = self.tables["gemm"]
        exact = df[(df["dtype"] == dtype) & (df["n"] == n) & (df["k"] == k)]
        return _series(exact, "m", "time_s") if exact["m"].nunique() >= 2 else None

    def _gemm_generic(self, dtype: str) -> tuple[np.ndarray, np.ndarray]:
        return self._curve(("gemm_generic", dtype), lambda p: p._build_gemm_generic(dtype))

    def _build_gemm_generic(self, dtype: str) -> tuple[np.ndarray, np.ndarray]:
        df = self.tables["gemm"]
        df = df[df["dtype"] == dtype]
        if df.empty:
            raise ProfileError(f"profile {self.fingerprint.name!r} has no {dtype} GEMM table; "
                               f"dtypes present: {sorted(set(self.tables['gemm']['dtype']))}")
        df = df.assign(flops=lambda t: 2.0 * t["m"] * t["n"] * t["k"])
        xs, ys = _series(df, "flops", "time_s")
        # Keep the lower envelope's monotone part: time never falls as work grows.
        return xs, np.maximum.accumulate(ys)

    def attention_time_s(self, doc_len: np.ndarray | float, *, heads: int, head_dim: int, causal: bool = True,
                         direction: str = "fwd", dtype: str = "bf16", per_document: bool = False) -> np.ndarray:
        """Attention-core time of documents of the given lengths (each a separate causal document,
        as in a varlen call), from the achieved FLOP/s at that document length. per_document: each is a
        kernel call or tile row of its own, and one shorter than the grid costs its smallest length's time
        (module docstring); otherwise (blocks of a context-parallel chunk) the rate is held."""
        rate_x, rate_y = self._attention_rate(direction, causal, head_dim, dtype)
        s = np.asarray(doc_len, dtype=float)
        floored = np.where(s > 0, np.maximum(s, rate_x[0]), 0.0) if per_document else s
        rate = loglog_interp(floored, rate_x, rate_y)
        return attention_flops(floored, heads, head_dim, causal, direction) / rate

    def _attention_rate(self, direction: str, causal: bool, head_dim: int, dtype: str):
        return self._curve(("attn", direction, causal, head_dim, dtype),
                           lambda p: p._build_attention_rate(direction, causal, head_dim, dtype))

    def _build_attention_rate(self, direction: str, causal: bool, head_dim: int, dtype: str):
        df = self.tables["attention"]
        df = df[(df["direction"] == direction) & (df["dtype"] == dtype)]
        if "layout" in df.columns:  # measured profiles: only packed varlen calls; other layouts are for study
            df = df[df["layout"].isna() | (df["layout"] == "varlen")]
        if df.empty:
            raise ProfileError(f"profile {self.fingerprint.name!r} has no {dtype} attention {direction} table")
        sub = df[df["causal"] == causal]
        if sub.empty:  # fall back to the other masking, FLOPs convention keeps rates comparable
            sub = df
        # Per-row rate: docs × per-doc FLOPs (of the row's own masking and heads) / time.
        per = np.array([float(attention_flops(r.doc_len, r.heads, r.head_dim, bool(r.causal), direction))
                        for r in sub.itertuples()]) * sub["docs"].to_numpy(float)
        sub = sub.assign(rate=per / sub["time_s"].to_numpy(float))
        dims = sorted(set(sub["head_dim"]))
        lo = max([d for d in dims if d <= head_dim], default=dims[0])
        hi = min([d for d in dims if d >= head_dim], default=dims[-1])
        if lo == hi:  # measured at this head dim, or outside the measured ones: the nearest (no extrapolation)
            return _series(sub[sub["head_dim"] == lo], "doc_len", "rate")
        # Between two measured head dims: the rate interpolated log-log in the head dim at each length (a
        # kernel's rate per FLOP rises with the head dim: more work per loaded row of Q, K and V).
        xl, yl = _series(sub[sub["head_dim"] == lo], "doc_len", "rate")
        xh, yh = _series(sub[sub["head_dim"] == hi], "doc_len", "rate")
        xs = np.union1d(xl, xh)
        w = math.log(head_dim / lo) / math.log(hi / lo)
        return xs, np.exp((1 - w) * np.log(loglog_interp(xs, xl, yl)) + w * np.log(loglog_interp(xs, xh, yh)))

    def collective_time_s(self, op: str, nbytes: np.ndarray | float, group_size: int,
                          scope: str = "intra", concurrent_groups: int = 1) -> np.ndarray:
        """Time of one collective of S = nbytes on `group_size` ranks while `concurrent_groups` interleaved groups
        run it at once (one per TP rank: a DP group of a TP mesh): t = S·F(n) / busbw(S), with busbw
        interpolated log-log in S and in the group size (nccl-tests conventions, REFERENCE 7.6). A profile
        without rows for that many groups prices the group as if alone."""
        b = np.asarray(nbytes, dtype=float)
        if group_size <= 1:
            return np.zeros_like(b)
        curves = self._busbw_curves(op, scope, concurrent_groups)
        sizes = sorted(curves)
        lo = max([g for g in sizes if g <= group_size], default=sizes[0])
        hi = min([g for g in sizes if g >= group_size], default=sizes[-1])

        def busbw(g: int) -> np.ndarray:
            return loglog_interp(b, *curves[g])

        if lo == hi:
            bw = busbw(lo)
        else:
            w = (math.log(group_size) - math.log(lo)) / (math.log(hi) - math.log(lo))
            bw = np.exp((1 - w) * np.log(busbw(lo)) + w * np.log(busbw(hi)))
        return b * bus_factor(op, group_size) / bw

    def _busbw_curves(self, op: str, scope: str,
                      concurrent_groups: int = 1) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Group size -> (bytes, busbw) of one collective in one scope (the other scope when the profile has
        only one) with `concurrent_groups` groups at once (one group's rows when it has none for that many),
        built once per profile: planners price thousands of units, each a table lookup."""
        def build(p: Profile) -> dict[int, tuple[np.ndarray, np.ndarray]]:
            df = p._collective_rows(op, scope, concurrent_groups)
            curves = {}
            for g in sorted(set(int(x) for x in df["group_size"])):
                sub = df[df["group_size"] == g]
                bw = sub["bytes"].to_numpy(float) * bus_factor(op, g) / sub["time_s"].to_numpy(float)
                curves[g] = _series(sub.assign(busbw=bw), "bytes", "busbw")
            return curves

        return self._curve(("collective", op, scope, concurrent_groups), build)

    def _collective_rows(self, op: str, scope: str, concurrent_groups: int) -> pd.DataFrame:
        """The collective table's rows of one op in one scope (the other scope when the profile has only one) with
        `concurrent_groups` groups at once (one group's rows when it has none for that many)."""
        df = self.tables["collective"]
        df = df[df["op"] == op]
        if df.empty:
            raise ProfileError(f"profile {self.fingerprint.name!r} has no {op} collective table")
        if not (df["scope"] == scope).any():
            df = df[df["scope"] == ("intra" if scope == "inter" else "inter")]  # single-node: no 'inter'
        else:
            df = df[df["scope"] == scope]
        conc = df[df["concurrent_groups"] == concurrent_groups]
        return conc if not conc.empty else df[df["concurrent_groups"] == 1]

    def collective_cpu_s(self, op: str, nbytes: np.ndarray | float, group_size: int, scope: str = "intra",
                         concurrent_groups: int = 1) -> np.ndarray:
        """The process CPU a member rank spends on one collective of S = nbytes (the table's cpu_s column, every
        thread of the rank: profiles.measure.collectives), log-log in S at the largest measured group size up to
        `group_size`, rows chosen as for the time. 0 where the profile has no such column (analytic profiles and
        ones measured before it)."""
        b = np.asarray(nbytes, dtype=float)

        def build(p: Profile) -> tuple[np.ndarray, np.ndarray] | None:
            df = p._collective_rows(op, scope, concurrent_groups)
            df = df.dropna(subset=["cpu_s"]) if "cpu_s" in df.columns else df.iloc[:0]
            sizes = sorted(set(int(g) for g in df["group_size"]))
            g = max([x for x in sizes if x <= group_size], default=sizes[0] if sizes else 0)
            sub = df[df["group_size"] == g]
            return _series(sub.assign(cpu_s=np.maximum(sub["cpu_s"].to_numpy(float), 1e-9)), "bytes",
                           "cpu_s") if len(sub) else None

        curve = self._curve(("collective_cpu", op, scope, concurrent_groups, group_size), build)
        return np.zeros_like(b) if curve is None else loglog_interp(b, *curve)

    def host_copy_time_s(self, nbytes: np.ndarray | float, direction: str = "d2h", pinned: bool = True) -> np.ndarray:
        """Host<->device copy time (on CPU profiles: memcpy, marked direction 'memcpy')."""
        def build(p: Profile) -> tuple[np.ndarray, np.ndarray]:
            df = p.tables["host_copy"]
            sub = df[(df["direction"] == direction) & (df["pinned"] == pinned)]
            if sub.empty:
                sub = df[df["direction"] == direction]
            if sub.empty:
                sub = df[df["direction"] == "memcpy"]
            if sub.empty:
                raise ProfileError(f"profile {p.fingerprint.name!r} has no host-copy table")
            return _series(sub, "bytes", "time_s")

        xs, ys = self._curve(("host_copy", direction, pinned), build)
        return loglog_interp(np.asarray(nbytes, dtype=float), xs, ys, below="clamp", above="proportional")

    def memory_time_s(self, nbytes: np.ndarray | float) -> np.ndarray:
        """A memory-bound kernel moving `nbytes` (read + written): the measured time-vs-bytes curve, the
        smallest size's time as the launch floor, the largest size's bandwidth held beyond it."""
        def build(p: Profile) -> tuple[np.ndarray, np.ndarray]:
            df = p.tables["memory"]
            if df.empty:
                raise ProfileError(f"profile {p.fingerprint.name!r} has no memory table; measure it with "
                                   "`meshplan profile --ops memory`")
            xs, ys = _series(df, "bytes", "time_s")
            return xs, np.maximum.accumulate(ys)  # moving more bytes never takes less time

        xs, ys = self._curve(("memory",), build)
        return loglog_interp(np.asarray(nbytes, dtype=float), xs, ys, below="clamp", above="proportional")

    def memory_kind_ratio(self, kind: str) -> float:
        """Bandwidth of an elementwise kernel of `kind` (costmodel.elementwise.KINDS) over the memory table kernel's:
        the profile's constant memory_kind_<kind> when measured (profiles/measure/memory.py), else 1 (streaming)."""
        c = self.constants.get(f"memory_kind_{kind}")
        ratio = float(c["value"]) if c else 1.0
        if not ratio > 0:
            raise ProfileError(f"profile {self.fingerprint.name!r}: constant memory_kind_{kind} must be > 0, "
                               f"got {ratio}")
        return ratio

    def attention_kernel_time_x(self, kernel: str, doc_len: np.ndarray | float) -> dict[str, np.ndarray]:
        """{"fwd", "bwd"}: causal attention's time with `kernel` (TrainingSpec.attention_kernel: fa1, fa1-triton,
        fa2, fa3, cudnn-2024) over this profile's table at each document length `doc_len`, from the constants that an
        analytic profile gives for the kernels with published rates on its GPU:
        attn_kernel_time_x_<kernel>_<direction>_at_<n> at n tokens, interpolated in log n and held beyond the ends,
        else attn_kernel_time_x_<kernel>_<direction> at every length. A measured profile holds the kernel it
        measured and gives none: only the table's own ("flash")."""
        got = {d: self.constants.get(f"attn_kernel_time_x_{kernel}_{d}") for d in ("fwd", "bwd")}
        if all(got.values()):
            x = np.log(np.maximum(np.asarray(doc_len, float), 1.0))
            out = {}
            for d, c in got.items():
                prefix = f"attn_kernel_time_x_{kernel}_{d}_at_"
                points = sorted((int(k[len(prefix):]), float(v["value"])) for k, v in self.constants.items()
                                if k.startswith(prefix))
                out[d] = (np.interp(x, np.log([n for n, _ in points]), [v for _, v in points]) if points
                          else np.full_like(x, float(c["value"])))
            return out
        known = sorted({k[len("attn_kernel_time_x_"):].split("_at_")[0].rsplit("_", 1)[0] for k in self.constants
                        if k.startswith("attn_kernel_time_x_")})
        name = self.fingerprint.name
        if not known:
            raise ProfileError(f"profile {name!r} prices only the attention kernel it holds (a measured profile: the "
                               f"one it measured), not {kernel!r}: use attention kernel flash (--attention-kernel "
                               f"flash), or measure a profile where {kernel} runs")
        raise ProfileError(f"profile {name!r} has no published rate for attention kernel {kernel!r} on its GPU; it "
                           f"knows {', '.join(known)} (or flash: its own table)")

    def constant(self, name: str) -> float:
        try:
            return float(self.constants[name]["value"])
        except KeyError:
            raise ProfileError(f"profile {self.fingerprint.name!r} lacks constant {name!r}") from None


@dataclass(frozen=True)
class _TableJSON:
    """One table as a profile file stores it."""

    columns: list[str]
    rows: list[list[Any]]  # one list per row, a value per column


@dataclass(frozen=True)
class _ConstantJSON:
    """One named constant: a number with its unit and where it comes from."""

    value: float
    unit: str = ""
    source: str = ""


@dataclass(frozen=True)
class _ProfileJSON:
    """The typed shape of a profile file (Profile.content_dict plus the sha256)."""

    schema_version: int
    fingerprint: Fingerprint
    tables: dict[str, _TableJSON]
    constants: dict[str, _ConstantJSON] = field(default_factory=dict)
    fits: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> coefficient -> value


def _table_frame(read: Reader, name: str, t: _TableJSON) -> pd.DataFrame:
    """A table's DataFrame, every row the width of the columns and every required column's values
    of the type TABLE_SCHEMA declares."""
    where = f"tables.{name}"
    cols = t.columns
    dup = sorted({c for c in cols if cols.count(c) > 1})
    if dup:
        raise ProfileError(f"{read.origin}: {where}.columns: duplicate column(s) {dup}")
    missing = [c for c in TABLE_SCHEMA[name] if c not in cols]
    if missing:
        raise ProfileError(f"{read.origin}: {where}: lacks column(s) {missing}")
    checks = [(c, cols.index(c), read.checker(tp, rng)) for c, (tp, rng) in TABLE_SCHEMA[name].items()]
    for i, row in enumerate(t.rows):
        if len(row) != len(cols):
            raise ProfileError(f"{read.origin}: {where}.rows[{i}]: expected {len(cols)} values (one per column "
                               f"{cols}), got {len(row)}")
        for c, j, check in checks:
            check(row[j], where, "rows", i, c)
    return pd.DataFrame(t.rows, columns=cols) if t.rows else pd.DataFrame(columns=cols)


def _py(v: Any) -> Any:
    """numpy scalars -> Python scalars for JSON."""
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_json(path: str | Path, what: str, error: type[Exception]) -> Any:
    """Parse a JSON file; an unreadable or corrupt file raises `error` with one actionable line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: truncated or corrupt {what} JSON (line {e.lineno}: {e.msg})") from None


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temp file in path's folder, which is synced and renamed onto path: readers
    (and a run killed mid-write) see the old file or the new one, never half of one. Missing folders are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to path atomically (atomic_write)."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


_DATA = resources.files("profiles").joinpath("data")


def profile_names() -> list[str]:
    return sorted(p.name[:-5] for p in _DATA.iterdir() if p.name.endswith(".json"))


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name (e.g. 'h100-sxm.analytic') or a profile JSON by path."""
    if name_or_path in profile_names():
        with resources.as_file(_DATA.joinpath(f"{name_or_path}.json")) as p:
            return Profile.load(p)
    p = Path(name_or_path)
    if p.exists() or p.suffix == ".json":
        prof = Profile.load(p)
        prof.path = str(p.resolve())
        return prof
    raise ProfileError(f"unknown profile {name_or_path!r}; shipped: {', '.join(profile_names()) or 'none'} "
                       "(or a path to a profile JSON)")

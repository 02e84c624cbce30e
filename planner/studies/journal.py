"""Sweep rows and where they are kept: the row's columns, the journal of finished rows, and the table.

Resumability: each finished point is appended as one JSON line to a journal beside the table
(`sweep.csv` -> `sweep.journal.jsonl`) with one write and an fsync. A line cut short by a kill is
ignored when the journal is read, and points are keyed deterministically (`Point.key`), so a rerun
skips finished points; the table is rebuilt from the journal in sweep order and written by rename,
so it holds every point once. The journal also serves later sweeps that share points. Each row
records a fingerprint of the planning code and data (costmodel, planner, profiles, presets); rows
made by other code are not reused, so a rerun after a planner change replans instead of serving
stale figures.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from planner.studies.fingerprint import code_fingerprint
from profiles.table import atomic_write

# One row per point (planner.studies.sweep.evaluate_point), in this order in every table.
SWEEP_COLUMNS: tuple[str, ...] = (
    "key", "model", "cluster", "gpus", "tp", "pp", "ep", "hdp", "context_tokens", "lengths", "tokens_per_step",
    "strategy", "steps", "seed", "offload", "static_mesh", "tokens_per_s", "mfu", "mfu_unhalved", "step_time_s",
    "lower_bound_s", "speedup_vs_static", "static_step_time_s", "peak_memory_bytes", "fits_hbm", "busiest_rank_s",
    "idlest_rank_s", "recompute", "recompute_modules", "zero_stage", "attention_kernel", "loss", "grad_accumulation",
    "training", "capacity_tokens",
    "profile", "profile_sha256", "code_sha256", "planning_s", "feasible", "reason")
MFU_CONVENTION = ("`mfu` divides model FLOPs (causal attention halved: the pairs actually computed, per document; "
                  "recompute excluded) by the profile's dense bf16 peak; `mfu_unhalved` counts causal attention in "
                  "full (PaLM / Megatron)")


def variant_label(zero_stage: int, attention_kernel: str | None, training: str | None = "") -> str:
    """What sets a sweep row apart beyond its layout and strategy, as people read it ("" for the defaults: ZeRO-1,
    the profile's own attention, no training flags), e.g. "zero 3, fa2 attention, dtype fp8"."""
    parts = [f"zero {int(zero_stage)}"] if int(zero_stage) != 1 else []
    if attention_kernel not in (None, "flash"):
        parts.append(f"{attention_kernel} attention")
    if training:
        parts.append(training)
    return ", ".join(parts)


def first_line(e: Exception) -> str:
    """The first line of an error's message (its type when the message is empty), for one-line reasons."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def journal_path(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".journal.jsonl")


class Journal:
    """Append-only JSON-lines record of finished points; one os.write per row, then fsync."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self, current_only: bool = False) -> dict[str, dict]:
        """Rows by key; the first row of a key wins; a torn last line (killed mid-write) is skipped, and
        with current_only so are rows made by other planning code (code_fingerprint)."""
        rows: dict[str, dict] = {}
        if not self.path.exists():
            return rows
        for line in self.path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict) and "key" in r and (
                    not current_only or r.get("code_sha256") == code_fingerprint(r.get("strategy"))):
                rows.setdefault(r["key"], r)
        return rows

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(json_row(row), allow_nan=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            if os.fstat(fd).st_size and not self._ends_with_newline():
                data = b"\n" + data  # isolate a torn line left by a kill
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"


def json_row(row: dict) -> dict:
    """A row with plain Python values and None for non-finite floats (strict JSON)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, (np.integer,)):
            v = int(v)
        elif isinstance(v, (float, np.floating)):
            v = float(v) if math.isfinite(v) else None
        elif isinstance(v, np.bool_):
            v = bool(v)
        out[k] = v
    return out


_FLOAT_COLUMNS = ("tokens_per_s", "mfu", "mfu_unhalved", "step_time_s", "lower_bound_s", "speedup_vs_static",
                  "static_step_time_s", "peak_memory_bytes", "busiest_rank_s", "idlest_rank_s", "planning_s")
_INT_COLUMNS = ("gpus", "tp", "pp", "context_tokens", "tokens_per_step", "steps", "seed")
_TEXT_COLUMNS = ("key", "model", "cluster", "lengths", "strategy", "static_mesh", "recompute", "recompute_modules",
                 "attention_kernel", "loss", "grad_accumulation", "training", "profile", "profile_sha256",
                 "code_sha256", "reason")
# Columns added after tables were first written, with the value every older row had
_LATER_COLUMNS = {"ep": 1, "attention_kernel": "flash", "loss": "online", "grad_accumulation": "fused",
                  "recompute_modules": "", "training": ""}


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """One dtype per column whatever the source (rows, CSV, Parquet), so tables compare equal."""
    df = df.reindex(columns=list(SWEEP_COLUMNS))
    for col in _FLOAT_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    for col in _INT_COLUMNS:
        df[col] = df[col].astype("int64")
    df["zero_stage"] = pd.to_numeric(df["zero_stage"]).fillna(1).astype("int64")  # rows from before --zero: ZeRO-1
    for col in ("hdp", "capacity_tokens"):  # unknown when the cost model could not be built
        df[col] = pd.array(pd.to_numeric(df[col], errors="coerce"), dtype="Int64")
    for col in _TEXT_COLUMNS:
        df[col] = df[col].astype(object).where(df[col].notna(), None)
    # tables from before the ep column: their keys name it where it is not 1 (Config.key)
    from_key = pd.to_numeric(df["key"].astype(str).str.extract(r"\|ep(\d+)(?=\|)", expand=False), errors="coerce")
    df["ep"] = pd.to_numeric(df["ep"], errors="coerce").fillna(from_key)
    for col, before in _LATER_COLUMNS.items():
        df[col] = df[col].where(df[col].notna(), before)
    df["ep"] = df["ep"].astype("int64")
    df["feasible"] = df["feasible"].astype(bool)
    df["offload"] = df["offload"].astype(bool)
    df["fits_hbm"] = pd.array(df["fits_hbm"].astype(object).where(df["fits_hbm"].notna(), None), dtype="boolean")
    return df


def rows_to_frame(rows: list[dict]) -> pd.DataFrame:
    return _typed(pd.DataFrame([{k: r.get(k) for k in SWEEP_COLUMNS} for r in rows], columns=list(SWEEP_COLUMNS)))


def table_paths(out: Path) -> tuple[Path, Path]:
    """(CSV, Parquet) paths of a sweep table named by `out` (either suffix, or none)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".csv", ".parquet") else out
    return stem.with_suffix(".csv"), stem.with_suffix(".parquet")


def write_table(df: pd.DataFrame, out: Path) -> tuple[Path, Path]:
    """CSV and Parquet, each written atomically (readers never see half a table)."""
    csv, pq = table_paths(out)
    atomic_write(csv, lambda p: df.to_csv(p, index=False))
    atomic_write(pq, lambda p: df.to_parquet(p, index=False))
    return csv, pq


def read_table(path: Path) -> pd.DataFrame:
    """A sweep table (.parquet, else CSV) checked before use: OSError naming the file and what is wrong when it
    is missing, empty, not of its format, lacks sweep columns or holds values of the wrong kind."""
    path = Path(path)
    if not path.is_file():
        raise OSError(f"{path}: {'a folder, not' if path.is_dir() else 'no such'} sweep table")
    kind = "Parquet" if path.suffix == ".parquet" else "CSV"
    if path.stat().st_size == 0:
        raise OSError(f"{path}: empty file, not a sweep table (write one with `meshplan whatif --out {path.name}`)")
    try:
        df = pd.read_parquet(path) if kind == "Parquet" else pd.read_csv(path)
    except ImportError as e:
        raise OSError(f"{path}: cannot read Parquet here ({first_line(e)}); use the CSV beside it") from None
    except (ValueError, OSError) as e:  # pandas and pyarrow parse errors derive from ValueError
        raise OSError(f"{path}: not a readable {kind} file ({first_line(e)})") from None
    missing = [c for c in SWEEP_COLUMNS if c not in df.columns and c not in _LATER_COLUMNS]
    if missing:
        raise OSError(f"{path}: not a meshplan sweep table (missing {len(missing)} of its columns: "
                      f"{', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''})")
    if df.empty:
        raise OSError(f"{path}: the sweep table has no rows")
    for col in [c for c in (*_INT_COLUMNS, "ep") if c in df.columns]:  # ep: tables from before it lack it
        v = pd.to_numeric(df[col], errors="coerce")
        bad = v.isna() | (v != v.round())
        if bad.any():
            raise OSError(f"{path}: column {col!r} must hold whole numbers, row {int(bad.argmax())} has "
                          f"{df[col].iloc[int(bad.argmax())]!r}")
    for col in ("feasible", "offload"):
        bad = ~df[col].map(lambda x: isinstance(x, (bool, np.bool_)) or str(x) in ("True", "False"))
        if bad.any():
            raise OSError(f"{path}: column {col!r} must hold True or False, row {int(bad.argmax())} has "
                          f"{df[col].iloc[int(bad.argmax())]!r}")
    for col in ("feasible", "offload"):
        df[col] = df[col].map(lambda x: x if isinstance(x, (bool, np.bool_)) else str(x) == "True")
    return _typed(df)


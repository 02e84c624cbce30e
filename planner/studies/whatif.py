"""What-if capacity studies: sweeps, the capacity search and the ByteScale reproduction grid.

A *config* is one planning case (model, cluster, GPUs, TP/PP, max context, length source, tokens
per step, steps, seed); a *point* is a config and a strategy. Each point is planned over `steps`
sampled global batches and simulated through planner.api, giving one row of the sweep table
(SWEEP_COLUMNS). A point that cannot be planned (model states do not fit, context too long for the
mesh, invalid layout) keeps its row with feasible=False and the one-line reason; so does a point where
a strategy raised anything else ("planner error (Type): ..."), a bug that should not sink a sweep.

Resumability: each finished point is appended as one JSON line to a journal beside the table
(`sweep.csv` -> `sweep.journal.jsonl`) with one write and an fsync. A line cut short by a kill is
ignored when the journal is read, and points are keyed deterministically (`Point.key`), so a rerun
skips finished points; the table is rebuilt from the journal in sweep order and written by rename,
so it holds every point once. The journal also serves later sweeps that share points. Each row
records a fingerprint of the planning code and data (costmodel, planner, profiles, presets); rows
made by other code are not reused, so a rerun after a planner change replans instead of serving
stale figures.

Static baseline: a static job must size its CP degree before it sees the data, so by default the
static mesh holds the sweep's max context (ByteScale §3: d_cp = S_max / C), not the longest
sequence of each sampled batch (`static_mesh="batch"`, what `meshplan plan` does). Speedups are
step-time ratios against that static plan of the same config.

Capacity search (`capacity_search`) — the layout rules, the same at every GPU count:
  * GPU counts: one node × 2^k, from `min_gpus` (default one node) to `max_gpus`, in increasing order;
  * layouts: tp in {1, 2, 4, 8} dividing the node and valid for the model's heads, pp in
    {1, 2, 4, 8} dividing the layers, tp·pp dividing the GPU count. Powers of two, so a layout
    allowed at G is allowed at every larger count;
  * memory feasibility is monotone in G for a fixed layout (ZeRO-1 states shrink as the HDP ranks
    grow, so C grows, and more ranks hold longer sequences); tests/test_whatif.py checks it;
  * a layout meets the target only when it plans and its simulated peak memory fits the HBM;
  * a layout whose step-time lower bound (planner/simulate/bounds.py) already misses the target is not planned
    (sound pruning; the cheap work term is tried first, the full bound in the worker before planning);
  * the others are planned cheapest first (fewer pipeline stages), best bound first among equals;
  * the answer is the first count, in increasing order, with a layout that meets the target: every layout
    of every smaller count was decided, so no smaller count on these rules meets it, and a harder target
    never gets a smaller answer. Larger counts are not planned. At the answer's count the search stops at
    the first layout that meets the target (the rest: status 'skipped'), or, with best_layout, plans every
    layout whose bound could beat the best found (the rest: 'bounded'), so the layout is the count's best.
  * planned layouts are journaled like sweep points (same Journal, same keys), so a rerun plans nothing
    twice; the rows and the answer do not depend on the journal or the number of workers (workers may
    plan a layout ahead that then goes unused: it is journaled for later runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import multiprocessing
import os
import signal
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, as_completed, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import numpy as np
import pandas as pd

from costmodel.flops import model_flops
from costmodel.presets import load_cluster, load_model
from costmodel.specs import SpecError, TrainingSpec
from costmodel.timing import CostModel
from planner.api import (BYTESCALE_TOKENS_PER_STEP, PlanRequest, build_cost_model, make_batches, make_plan,
                         summarize)
from planner.workload import GlobalBatch
from planner.simulate import lower_bound_s, total_compute_s
from planner.plan import PlanError
from planner.workload import SourceError, format_tokens, open_source
from planner.strategies import STRATEGIES, PlanOptions
from planner.strategies.static import static_cp_degree
from profiles.table import Profile, load_profile

# Errors that make one point infeasible (its row says why); anything else is a bug and propagates.
POINT_ERRORS: tuple[type[Exception], ...] = (SpecError, PlanError, SourceError)

SWEEP_COLUMNS: tuple[str, ...] = (
    "key", "model", "cluster", "gpus", "tp", "pp", "hdp", "context_tokens", "lengths", "tokens_per_step",
    "strategy", "steps", "seed", "offload", "static_mesh", "tokens_per_s", "mfu", "mfu_unhalved", "step_time_s",
    "lower_bound_s", "speedup_vs_static", "static_step_time_s", "peak_memory_bytes", "fits_hbm", "busiest_rank_s",
    "idlest_rank_s", "recompute", "capacity_tokens", "profile", "profile_sha256", "code_sha256", "planning_s",
    "feasible", "reason")
MFU_CONVENTION = ("`mfu` divides model FLOPs (causal attention halved: the pairs actually computed, per document; "
                  "recompute excluded) by the profile's dense bf16 peak; `mfu_unhalved` counts causal attention in "
                  "full (PaLM / Megatron)")

StaticMesh = Literal["context", "batch"]


# ---- points -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One planning case: everything a point needs except its strategy."""

    model: str  # model preset or path
    cluster: str  # cluster preset or path
    gpus: int  # world size
    tp: int  # tensor-parallel degree
    pp: int  # pipeline stages (1F1B in the simulator)
    context_tokens: int  # max context; longer documents are split
    lengths: str  # length source spec (planner.workload)
    tokens_per_step: int = BYTESCALE_TOKENS_PER_STEP  # global batch token budget
    steps: int = 2  # sampled global batches planned per point
    seed: int = 0  # length source seed
    recompute: str = "auto"  # none | selective | full | auto (planner.api.resolve_setup)
    offload: bool = True  # selective activation offload (hdp strategies)
    static_mesh: StaticMesh = "context"  # static CP sized for the max context, or per batch

    @property
    def key(self) -> str:
        """Deterministic, human-readable identity of the config (journal key prefix)."""
        return (f"{self.model}|{self.cluster}|g{self.gpus}|tp{self.tp}|pp{self.pp}|ctx{self.context_tokens}|"
                f"{self.lengths}|tps{self.tokens_per_step}|steps{self.steps}|seed{self.seed}|rc-{self.recompute}|"
                f"off{int(self.offload)}|static-{self.static_mesh}")

    def request(self, options: PlanOptions | None = None) -> PlanRequest:
        return PlanRequest(model=self.model, cluster=self.cluster, gpus=self.gpus, tp=self.tp, pp=self.pp,
                           lengths=self.lengths, steps=self.steps, tokens_per_step=self.tokens_per_step,
                           max_context_tokens=self.context_tokens, recompute=self.recompute, seed=self.seed,
                           options=options or PlanOptions(offload=self.offload, seed=self.seed))


@dataclass(frozen=True)
class Point:
    config: Config
    strategy: str

    @property
    def key(self) -> str:
        return f"{self.config.key}|{self.strategy}"


@dataclass(frozen=True)
class SweepSpec:
    """A Cartesian sweep; points come in the order of the fields (strategies innermost)."""

    models: tuple[str, ...] = ("llama-7b",)
    clusters: tuple[str, ...] = ("dgx-h100",)
    gpus: tuple[int, ...] = (256, 512)
    tps: tuple[int, ...] = (1,)
    pps: tuple[int, ...] = (1,)
    contexts_tokens: tuple[int, ...] = (256 * 2**10, 2**20)
    lengths: tuple[str, ...] = ("byted-like",)
    strategies: tuple[str, ...] = ("static", "hdp")
    steps: int = 2
    tokens_per_step: int = BYTESCALE_TOKENS_PER_STEP
    seed: int = 0
    recompute: str = "auto"
    offload: bool = True
    static_mesh: StaticMesh = "context"

    def configs(self) -> list[Config]:
        return [Config(m, c, g, t, p, ctx, ln, self.tokens_per_step, self.steps, self.seed, self.recompute,
                       self.offload, self.static_mesh)
                for m, c, g, t, p, ctx, ln in itertools.product(self.models, self.clusters, self.gpus, self.tps,
                                                                self.pps, self.contexts_tokens, self.lengths)]

    def points(self) -> list[Point]:
        return [Point(c, s) for c in self.configs() for s in self.strategies]


def check_inputs(points: Iterable[Point]) -> None:
    """Fail fast, once, on inputs that would make every point fail (unknown preset, strategy, source)."""
    pts = list(points)
    for name in sorted({p.strategy for p in pts}):
        if name not in STRATEGIES:
            raise PlanError(f"unknown strategy {name!r}; one of {', '.join(STRATEGIES)}")
    for m in sorted({p.config.model for p in pts}):
        load_model(m)
    for c in sorted({p.config.cluster for p in pts}):
        load_cluster(c)
    for s in sorted({p.config.lengths for p in pts}):
        open_source(s)
    if not {p.config.static_mesh for p in pts} <= {"context", "batch"}:
        raise PlanError("static mesh must be 'context' or 'batch'")


# ---- evaluation (cached across points of one process) -------------------------------------------
# Packages that do not change a point's figures: the executor, measurement, presentation, and the
# studies themselves (they choose points; planning and costing them happens elsewhere).
_NOT_PLANNING = ("planner/runtime/", "planner/report/", "planner/studies/", "profiles/measure/")
_SHARED_STRATEGY_FILES = {"common.py", "static.py"}  # every row carries static's time (its speedup reference)


@functools.lru_cache(maxsize=None)
def code_fingerprint(strategy: str | None = None) -> str:
    """sha256 (12 hex digits) of the sources and data files that determine a point's figures: costmodel,
    profiles, presets, planner, and of the strategies only the shared helpers, static and `strategy`'s
    own module or package (None: all of them), so work on one strategy does not invalidate another's rows."""
    import hashlib
    import sys

    root = Path(__file__).resolve().parents[2]
    strategies_dir = root / "planner" / "strategies"
    own = None
    if strategy is not None:
        if strategy not in STRATEGIES:
            return ""
        own = Path(sys.modules[STRATEGIES[strategy].__module__].__file__).resolve()
        if own.name == "__init__.py":  # a strategy package (ilp): all of its modules are its own
            own = own.parent
    h = hashlib.sha256()
    for pkg in ("costmodel", "planner", "profiles"):
        for f in sorted((root / pkg).rglob("*")):
            rel = f.relative_to(root).as_posix()
            if (f.suffix not in (".py", ".json", ".gz") or not f.is_file()
                    or rel.startswith(_NOT_PLANNING) or "__pycache__" in rel):
                continue
            top = strategies_dir / f.relative_to(strategies_dir).parts[0] if strategies_dir in f.parents else None
            if own is not None and top is not None and top.name not in _SHARED_STRATEGY_FILES and top.resolve() != own:
                continue
            h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


@functools.lru_cache(maxsize=8)
def _profile(name: str) -> Profile:
    """A profile loaded once per process: loading parses and hashes the file (0.2 s) and a Profile caches its
    interpolation tables, so the cost models of many layouts built on one object cost 10x less."""
    return load_profile(name)


@functools.lru_cache(maxsize=64)
def _cost_model(req: PlanRequest) -> CostModel:
    return build_cost_model(req, load=_profile)


@functools.lru_cache(maxsize=16)
def _batches(req: PlanRequest) -> list[GlobalBatch]:
    return make_batches(req)


def cost_model_of(config: Config) -> CostModel:
    """Cost model of a config, shared by every point with the same specs (only these fields matter)."""
    r = config.request()
    return _cost_model(dataclasses.replace(r, lengths="", steps=1, tokens_per_step=1, seed=0,
                                           options=PlanOptions()))


def batches_of(config: Config) -> list[GlobalBatch]:
    """Sampled global batches of a config, shared by every point with the same data fields."""
    r = config.request()
    return _batches(PlanRequest(lengths=r.lengths, steps=r.steps, tokens_per_step=r.tokens_per_step,
                                max_context_tokens=r.max_context_tokens, seed=r.seed))


def options_for(config: Config, strategy: str, cm: CostModel) -> PlanOptions:
    """Plan options of a point; static gets the CP degree of its static-mesh rule."""
    opt = PlanOptions(offload=config.offload, seed=config.seed)
    if strategy == "static" and config.static_mesh == "context":
        opt = dataclasses.replace(opt, static_cp=static_cp_degree(config.context_tokens, cm.capacity_tokens,
                                                                  cm.setup.hdp))
    return opt


def _base_row(point: Point) -> dict:
    c = point.config
    row = {k: None for k in SWEEP_COLUMNS}
    row.update(key=point.key, model=c.model, cluster=c.cluster, gpus=c.gpus, tp=c.tp, pp=c.pp,
               context_tokens=c.context_tokens, lengths=c.lengths, tokens_per_step=c.tokens_per_step,
               strategy=point.strategy, steps=c.steps, seed=c.seed, offload=c.offload, static_mesh=c.static_mesh,
               recompute=c.recompute, code_sha256=code_fingerprint(point.strategy), feasible=False)
    return row


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def evaluate_point(point: Point, static_step_time_s: float | None = None) -> dict:
    """Plan and simulate one point; a row of SWEEP_COLUMNS (infeasible: feasible=False and the reason).
    `static_step_time_s`: the config's static step time, the reference of speedup_vs_static."""
    row = _base_row(point)
    c = point.config
    try:
        cm = cost_model_of(c)
        row.update(hdp=cm.setup.hdp, recompute=cm.setup.training.recompute, capacity_tokens=cm.capacity_tokens,
                   profile=cm.profile.fingerprint.name, profile_sha256=cm.profile.fingerprint.sha256)
        req = c.request(options_for(c, point.strategy, cm))
        plan = make_plan(req, point.strategy, cm, batches_of(c))
    except POINT_ERRORS as e:
        row["reason"] = _first_line(e)
        return row
    except Exception as e:  # a planner bug must not sink a whole sweep; the row names it
        row["reason"] = f"planner error ({type(e).__name__}): {_first_line(e)}"
        return row
    is_static = point.strategy == "static"
    s = summarize(plan, cm, None if is_static else static_step_time_s)
    row.update(tokens_per_s=s.tokens_per_s, mfu=s.mfu, mfu_unhalved=s.mfu_unhalved, step_time_s=s.step_time_s,
               lower_bound_s=s.lower_bound_s, speedup_vs_static=1.0 if is_static else s.speedup_vs_static,
               static_step_time_s=s.step_time_s if is_static else static_step_time_s,
               peak_memory_bytes=s.peak_memory_bytes, busiest_rank_s=s.busiest_rank_s,
               idlest_rank_s=s.idlest_rank_s, planning_s=s.planning_s, feasible=True,
               fits_hbm=s.peak_memory_bytes <= cm.budget.hbm_bytes)
    if not row["fits_hbm"]:  # the plan validated, but the simulator's peak says it would not run
        row["reason"] = (f"predicted peak memory {s.peak_memory_bytes / 1e9:.1f} GB exceeds the "
                         f"{cm.budget.hbm_bytes / 1e9:.0f} GB HBM")
    return row


def _config_rows(config: Config, strategies: tuple[str, ...], static_step_time_s: float | None,
                 plan_static: bool) -> Iterator[dict]:
    """Rows of one config's pending strategies, static first: its time is every speedup's reference.
    plan_static: the static time is not known yet, so static is planned even without a row of its own."""
    pending = list(strategies)
    if "static" in pending:
        pending.remove("static")
        row = evaluate_point(Point(config, "static"))
        static_step_time_s = row["step_time_s"]
        yield row
    elif plan_static:
        static_step_time_s = evaluate_point(Point(config, "static"))["step_time_s"]
    for s in pending:
        yield evaluate_point(Point(config, s), static_step_time_s)


def _config_rows_list(args: tuple) -> list[dict]:  # process-pool entry point (picklable)
    return list(_config_rows(*args))


# ---- journal and table --------------------------------------------------------------------------
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
_TEXT_COLUMNS = ("key", "model", "cluster", "lengths", "strategy", "static_mesh", "recompute", "profile",
                 "profile_sha256", "code_sha256", "reason")


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """One dtype per column whatever the source (rows, CSV, Parquet), so tables compare equal."""
    df = df.reindex(columns=list(SWEEP_COLUMNS))
    for col in _FLOAT_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    for col in _INT_COLUMNS:
        df[col] = df[col].astype("int64")
    for col in ("hdp", "capacity_tokens"):  # unknown when the cost model could not be built
        df[col] = pd.array(pd.to_numeric(df[col], errors="coerce"), dtype="Int64")
    for col in _TEXT_COLUMNS:
        df[col] = df[col].astype(object).where(df[col].notna(), None)
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
    """CSV and Parquet, each written to a temp file and renamed (readers never see half a table)."""
    csv, pq = table_paths(out)
    csv.parent.mkdir(parents=True, exist_ok=True)
    for path, write in ((csv, lambda p: df.to_csv(p, index=False)), (pq, lambda p: df.to_parquet(p, index=False))):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
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
        raise OSError(f"{path}: cannot read Parquet here ({_first_line(e)}); use the CSV beside it") from None
    except (ValueError, OSError) as e:  # pandas and pyarrow parse errors derive from ValueError
        raise OSError(f"{path}: not a readable {kind} file ({_first_line(e)})") from None
    missing = [c for c in SWEEP_COLUMNS if c not in df.columns]
    if missing:
        raise OSError(f"{path}: not a meshplan sweep table (missing {len(missing)} of its columns: "
                      f"{', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''})")
    if df.empty:
        raise OSError(f"{path}: the sweep table has no rows")
    for col in _INT_COLUMNS:
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


# ---- the sweep ------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    table: pd.DataFrame  # one row per point, in sweep order
    computed: int  # points planned in this run
    reused: int  # points taken from the journal
    paths: tuple[Path, ...] = ()  # CSV, Parquet (when an output was given)


def run_sweep(points: list[Point], out: Path | None = None, *, workers: int = 1,
              on_point: Callable[[Point, dict], None] | None = None) -> SweepResult:
    """Plan every point not yet in the journal beside `out`, journaling each as it finishes; then write
    the table (CSV + Parquet) of all `points`, each once, in the given order. `on_point(point, row)` is
    called after each row is journaled (progress bars; tests interrupt through it). With workers > 1
    configs are planned in a process pool; rows are still journaled one by one by this process.
    If interrupted, the table of the points finished so far is written before the error propagates."""
    seen: set[str] = set()
    points = [p for p in points if not (p.key in seen or seen.add(p.key))]
    check_inputs(points)
    journal = Journal(journal_path(out)) if out is not None else None
    done = journal.load(current_only=True) if journal else {}
    wanted = {p.key for p in points}
    reused = sum(1 for k in wanted if k in done)
    by_key = {p.key: p for p in points}
    rows: dict[str, dict] = {k: r for k, r in done.items() if k in wanted}
    computed = 0

    def record(row: dict) -> None:
        nonlocal computed
        if journal:
            journal.append(row)
        rows[row["key"]] = row
        computed += 1
        if on_point:
            on_point(by_key[row["key"]], row)

    for p in points:
        if p.key in rows and on_point:
            on_point(p, rows[p.key])
    tasks = _pending_tasks(points, done)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for args in tasks:
                for row in _config_rows(*args):
                    record(row)
        else:
            with worker_pool(min(workers, len(tasks))) as pool:
                futures = [pool.submit(_config_rows_list, args) for args in tasks]
                for f in as_completed(futures):
                    for row in f.result():
                        record(row)
    finally:
        df = rows_to_frame([rows[p.key] for p in points if p.key in rows])
        paths = write_table(df, out) if out is not None else ()
    return SweepResult(df, computed, reused, tuple(paths))


def _pending_tasks(points: list[Point], done: dict[str, dict]) -> list[tuple]:
    """(config, pending strategies, known static step time, whether static must be planned) per config;
    the static time comes from the journal's static row or from any journaled row of the config."""
    by_config: dict[Config, list[str]] = {}
    for p in points:
        if p.key not in done:
            by_config.setdefault(p.config, []).append(p.strategy)
    static_time: dict[str, float] = {}  # config key -> a journaled static step time
    for r in done.values():
        if r.get("static_step_time_s") is not None:
            static_time.setdefault(r["key"].rsplit("|", 1)[0], r["static_step_time_s"])
    tasks = []
    for cfg, strategies in by_config.items():
        static_row = done.get(Point(cfg, "static").key)
        if static_row is not None:  # infeasible static: no speedups, and no point replanning it
            tasks.append((cfg, tuple(strategies), static_row.get("step_time_s"), False))
            continue
        known = static_time.get(cfg.key)
        tasks.append((cfg, tuple(strategies), known, known is None))
    return tasks


# ---- worker processes ------------------------------------------------------------------------------
@contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A process pool that never outlives its use: on leaving (normally, on an error or on Ctrl-C) work not
    started is cancelled and the workers are terminated at once; `shutdown(wait=True)` would first wait for
    the points being planned, minutes at large GPU counts. Workers ignore SIGINT (this process handles it)
    and exit by themselves if this process dies without ending them (SIGKILL), so none is left orphaned."""
    # spawn, not fork: the parent may run threads (a progress bar) that fork would copy mid-lock.
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(os.getpid(),))
    try:
        with _sigint_ignored():  # workers start now (one per submit) and inherit it: no traceback on Ctrl-C
            for _ in range(workers):
                pool.submit(int)
        yield pool
    finally:
        stop_pool(pool)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (and only it receives Ctrl-C)
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started, terminate the workers (those planning too) and reap them."""
    workers = list((getattr(pool, "_processes", None) or {}).values())  # no public handle before Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for w in workers:
        if w.is_alive():
            w.terminate()
    for w in workers:
        w.join(timeout=2)
        if w.is_alive():
            w.kill()
            w.join()


def _worker_init(parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # already so when started from the main thread

    def exit_when_orphaned() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_when_orphaned, daemon=True, name="parent-watch").start()


@contextmanager
def progress_bar(total: int, description: str = "planning", enabled: bool = True):
    """A rich progress bar on stderr; yields the `on_point` callback for run_sweep."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True,
                  disable=not enabled) as prog:
        task = prog.add_task(description, total=total)

        def on_point(point: Point, row: dict) -> None:
            c = point.config
            prog.update(task, advance=1, description=f"{c.model} {c.gpus} GPUs {format_tokens(c.context_tokens)} "
                                                     f"{c.lengths} {point.strategy}")

        yield on_point


# ---- capacity search --------------------------------------------------------------------------------
Metric = Literal["tokens_per_s", "step_time_s", "mfu"]


@dataclass(frozen=True)
class LayoutBound:
    """What no plan of a layout can beat: its mean step time is at least step_time_s, so its tokens/s and
    MFU are at most these."""

    step_time_s: float
    tokens_per_s: float
    mfu: float


def layout_bound(cm: CostModel, batches: list[GlobalBatch], full: bool = True) -> LayoutBound:
    """Bound of a layout on the sampled batches. full=False keeps only the work term of
    planner.simulate.bounds.lower_bound_s (compute spread over every rank, plus the gradient sync): weaker but 10-100x
    cheaper, it skips the search over the longest sequence's degree."""
    if full:
        lb = float(np.mean([lower_bound_s(b.lengths_tokens, cm, cm.setup.hdp) for b in batches]))
    else:
        lb = float(np.mean([total_compute_s(b.lengths_tokens, cm) / (cm.setup.hdp * cm.pp) for b in batches]))
        lb += cm.grad_sync_s(cm.setup.hdp)
    tokens = float(np.mean([b.total_tokens for b in batches]))
    flops = float(np.mean([model_flops(b.lengths_tokens, cm.model, True) for b in batches]))
    return LayoutBound(lb, tokens / lb, flops / (lb * cm.setup.cluster.world_size * cm.peak_flops()))


@dataclass(frozen=True)
class Target:
    """What the capacity search must reach: tokens/s ≥ v, step time ≤ v, or MFU (halved) ≥ v."""

    metric: Metric
    value: float

    def __post_init__(self) -> None:
        if self.metric not in ("tokens_per_s", "step_time_s", "mfu") or not (0 < self.value < math.inf):
            raise PlanError(f"capacity target must be tokens_per_s, step_time_s or mfu with a positive finite value, "
                            f"got {self.metric}={self.value!r}")
        if self.metric == "mfu" and self.value > 1:
            raise PlanError(f"MFU target {self.value:g} is above 100%; give a fraction (0.4) or a percentage (40)")

    def key(self, value: float) -> float:
        """Order of the metric's values: smaller is better."""
        return value if self.metric == "step_time_s" else -value

    def reached_by(self, value: float) -> bool:
        return self.key(value) <= self.key(self.value)

    def met(self, row: dict) -> bool:
        v = row.get(self.metric)
        if not row.get("feasible") or not row.get("fits_hbm") or v is None or not math.isfinite(v):
            return False
        return self.reached_by(v)

    def sort_key(self, row: dict) -> float:
        """Smaller is better."""
        return self.key(row[self.metric])

    def reachable(self, bound: LayoutBound) -> bool:
        """False when even the layout's bound misses the target: no plan of it can reach it."""
        return self.reached_by(getattr(bound, self.metric))

    def describe(self) -> str:
        if self.metric == "tokens_per_s":
            return f"tokens/s >= {self.value:,.0f}"
        if self.metric == "step_time_s":
            return f"step time <= {self.value:g} s"
        return f"MFU >= {self.value:.1%}"

    def format(self, value: float) -> str:
        return (f"{value:,.0f} tokens/s" if self.metric == "tokens_per_s" else f"{value:.3g} s/step"
                if self.metric == "step_time_s" else f"MFU {value:.1%}")


@dataclass(frozen=True)
class LayoutRules:
    """The (GPU count, tp, pp) grid of the capacity search; see the module docstring."""

    tps: tuple[int, ...] = (1, 2, 4, 8)
    pps: tuple[int, ...] = (1, 2, 4, 8)
    min_gpus: int | None = None  # None: one node
    max_gpus: int = 16384

    def __post_init__(self) -> None:
        for name, values in (("tp", self.tps), ("pp", self.pps)):
            if not values or any(int(v) != v or v < 1 for v in values):
                raise PlanError(f"capacity search: {name} degrees must be positive integers, got {list(values)}")
        if self.min_gpus is not None and self.min_gpus < 1:
            raise PlanError(f"capacity search: min GPUs must be at least 1, got {self.min_gpus}")
        if self.max_gpus < 1:
            raise PlanError(f"capacity search: max GPUs must be at least 1, got {self.max_gpus}")
        if self.min_gpus is not None and self.min_gpus > self.max_gpus:
            raise PlanError(f"capacity search: min GPUs {self.min_gpus} is larger than max GPUs {self.max_gpus}")

    def gpu_counts(self, cluster: str) -> list[int]:
        per_node = load_cluster(cluster).gpus_per_node
        lo = self.min_gpus or per_node
        if lo < per_node:  # partial nodes: powers of two up to a node
            counts = [g for g in (2 ** k for k in range(0, 31)) if lo <= g < per_node]
        else:
            counts = []
        g = per_node
        while g <= self.max_gpus:
            if g >= lo:
                counts.append(g)
            g *= 2
        counts = [g for g in counts if g <= self.max_gpus]
        if not counts:
            raise PlanError(f"capacity search: no GPU count between {lo} and {self.max_gpus} (counts are powers of "
                            f"two up to a node, then {per_node}-GPU nodes x 2^k)")
        return counts

    def layouts(self, model: str, cluster: str, gpus: int) -> list[tuple[int, int]]:
        m, c = load_model(model), load_cluster(cluster).with_gpus(gpus)
        out = []
        for tp, pp in itertools.product(sorted(self.tps), sorted(self.pps)):
            try:
                TrainingSpec(tp=tp, pp=pp).check_against(m, c)
            except SpecError:
                continue
            out.append((tp, pp))
        return sorted(out, key=lambda x: (x[0] * x[1], x[1]))


@dataclass(frozen=True)
class CapacityProgress:
    """Where a capacity search stands, for progress displays."""

    gpus: int  # the GPU count being searched
    count_index: int  # its position among the rules' counts, from 1
    counts: int  # GPU counts the rules allow (the search stops at the first that meets the target)
    count_done: int  # layouts decided at this count
    count_total: int  # layouts at this count
    done: int  # layouts decided over all counts
    total: int  # layouts over all counts
    activity: str  # what runs now, e.g. "planning tp1 pp1"


@dataclass
class CapacityResult:
    target: Target
    answer: dict | None  # the smallest GPU count's best planned layout meeting the target (a sweep row + status)
    runners_up: list[dict]  # other planned layouts meeting it (never from counts beyond the answer's)
    table: pd.DataFrame  # every (gpus, tp, pp) decided, by count then layout; status in CAPACITY_STATUSES
    rules: LayoutRules
    planned: int = 0  # layouts planned by this run
    reused: int = 0  # layouts whose row came from the journal

    def not_planned(self) -> pd.DataFrame:
        """Layouts at the answer's count left unplanned once it met the target (status 'skipped')."""
        return self.table[self.table["status"] == "skipped"] if len(self.table) else self.table


CAPACITY_STATUSES = {
    "meets": "planned; fits the HBM and meets the target",
    "misses": "planned; fits the HBM but misses the target",
    "over-hbm": "planned; the simulated peak memory exceeds the HBM",
    "infeasible": "cannot be planned (the reason says why)",
    "pruned": "not planned: its lower bound already misses the target",
    "bounded": "not planned: its bound cannot beat the answer found at the same count",
    "skipped": "not planned: the count already meets the target (--best-layout plans it)",
}


def default_capacity_table() -> Path:
    """Where `meshplan whatif capacity` journals its layouts unless --table is given (outside the repo)."""
    return Path(tempfile.gettempdir()) / "meshplan-capacity" / "capacity.csv"


def capacity_search(model: str, context_tokens: int, target: Target, *, cluster: str = "dgx-h100",
                    lengths: str = "byted-like", strategy: str = "hdp", rules: LayoutRules = LayoutRules(),
                    tokens_per_step: int = BYTESCALE_TOKENS_PER_STEP, steps: int = 2, seed: int = 0,
                    recompute: str = "auto", offload: bool = True, runners_up: int = 5, best_layout: bool = False,
                    exhaustive: bool = False, workers: int = 1, journal: Path | None = None,
                    on_progress: Callable[[CapacityProgress], None] | None = None) -> CapacityResult:
    """Smallest GPU count (and a tp, pp) whose `strategy` plan meets `target`, scanning the rules' counts in
    increasing order and stopping at the first count that meets it: every smaller count was decided, so it is
    minimal. Layouts whose bound misses the target are not planned; the others are planned cheapest first
    (fewer pipeline stages: PP plans cost far more), best bound first among equals. At the answer's count the
    search stops at the first layout that meets the target (the others are 'skipped'), or with best_layout
    plans every layout whose bound could beat the best so far (the others are 'bounded'). exhaustive=True
    plans every count and layout. workers > 1 plans layouts in worker processes (same rows, same answer).
    journal: JSON-lines file of planned layouts (Journal, shared with sweeps); a rerun reuses its rows."""
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    open_source(lengths)
    counts = rules.gpu_counts(cluster)
    layouts = {g: rules.layouts(model, cluster, g) for g in counts}
    if not any(layouts.values()):
        raise PlanError(f"capacity search: no tp in {list(rules.tps)} and pp in {list(rules.pps)} is valid for "
                        f"{model} on {cluster} (tp must divide the heads and the node, pp the layers)")
    search = _CapacitySearch(target, strategy, Journal(journal) if journal else None, exhaustive, best_layout,
                             on_progress, sum(len(v) for v in layouts.values()), len(counts))
    # Workers start now: they import while this process bounds the small counts (lazily: 30% slower on 2 cores).
    with worker_pool(workers) if workers > 1 else contextlib.nullcontext(None) as pool:
        for i, gpus in enumerate(counts, 1):
            cfgs = [Config(model, cluster, gpus, tp, pp, context_tokens, lengths, tokens_per_step, steps, seed,
                           recompute, offload) for tp, pp in layouts[gpus]]
            if search.decide_count(gpus, i, cfgs, pool, workers) and not exhaustive:
                break
    rows = search.rows
    meeting = sorted((r for r in rows if r["status"] == "meets"),
                     key=lambda r: (r["gpus"], target.sort_key(r), r["tp"] * r["pp"], r["pp"]))
    return CapacityResult(target, meeting[0] if meeting else None, meeting[1:1 + runners_up], pd.DataFrame(rows),
                          rules, search.planned, search.reused)


class _CapacitySearch:
    """State of one capacity search: the rows decided so far, the journal, counters for progress and the report."""

    def __init__(self, target: Target, strategy: str, journal: Journal | None, exhaustive: bool, best_layout: bool,
                 on_progress: Callable[[CapacityProgress], None] | None, total: int, counts: int) -> None:
        self.target, self.strategy, self.journal = target, strategy, journal
        self.exhaustive, self.best_layout, self.on_progress = exhaustive, best_layout, on_progress
        self.known = journal.load(current_only=True) if journal else {}  # planned rows by point key
        self.rows: list[dict] = []
        self.planned = self.reused = self.done = 0
        self.total, self.counts = total, counts

    def decide_count(self, gpus: int, index: int, cfgs: list[Config], pool: ProcessPoolExecutor | None,
                     workers: int) -> bool:
        """Decide every layout of one GPU count; True when one meets the target. Rows go to self.rows in the
        rules' order; which layouts get planned depends only on the inputs (not on workers or the journal)."""
        decided: dict[Config, dict] = {}

        def show(activity: str) -> None:
            if self.on_progress:
                self.on_progress(CapacityProgress(gpus, index, self.counts, len(decided), len(cfgs), self.done,
                                                  self.total, activity))

        def decide(cfg: Config, row: dict) -> dict:
            decided[cfg] = row = self._with_status(row)
            self.done += 1
            show(f"tp{cfg.tp} pp{cfg.pp}: {row['status']}")
            return row

        candidates: list[tuple[Config, LayoutBound | None]] = []
        for cfg in cfgs:
            show(f"bounding tp{cfg.tp} pp{cfg.pp}")
            row, bound = self._without_planning(cfg)
            if row is not None:
                decide(cfg, row)
            else:
                candidates.append((cfg, bound))
        # Cheapest first (PP plans cost 10-100x more), best bound first among equals: an early hit is cheap.
        candidates.sort(key=lambda c: (c[0].pp, self._bound_key(c[1]), c[0].tp))
        tasks = [(cfg, self.strategy, self.target, not self.exhaustive) for cfg, _ in candidates
                 if Point(cfg, self.strategy).key not in self.known]
        runner = _LayoutRunner(pool, workers, self._record)
        runner.start(tasks)
        best: dict | None = None
        for cfg, bound in candidates:
            key = Point(cfg, self.strategy).key
            reason = None if best is None or self.exhaustive else self._why_not_planned(gpus, bound, best)
            if reason is not None:
                runner.drop(key)
                decide(cfg, self._unplanned(cfg, bound, *reason))
                continue
            if key in self.known:
                self.reused += 1
                row = dict(self.known[key])
            else:
                show(f"planning tp{cfg.tp} pp{cfg.pp}" + (f" (+{runner.busy() - 1} ahead)" if runner.busy() > 1
                                                          else ""))
                row = runner.result(key)
            row = decide(cfg, row)
            if row["status"] == "meets" and (best is None or self.target.sort_key(row) < self.target.sort_key(best)):
                best = row
        runner.stop()
        self.rows.extend(decided[cfg] for cfg in cfgs)
        return best is not None

    def _without_planning(self, cfg: Config) -> tuple[dict | None, LayoutBound | None]:
        """The row of a layout decided without planning (no cost model: infeasible; the work bound misses:
        pruned), else its work bound (None when exhaustive). Computed even for journaled layouts: the
        order of planning, and so the answer, must not depend on what the journal holds."""
        point = Point(cfg, self.strategy)
        try:
            cm = cost_model_of(cfg)
            batches = batches_of(cfg)
        except POINT_ERRORS:
            if point.key in self.known:
                self.reused += 1
                return dict(self.known[point.key]), None
            return self._record(evaluate_point(point)), None  # the failure, recorded the sweep's way
        if self.exhaustive:
            return None, None
        bound = layout_bound(cm, batches, full=False)
        if not self.target.reachable(bound):
            return _pruned_row(point, cm, bound, self.target, "compute spread over every rank"), None
        return None, bound

    def _bound_key(self, bound: LayoutBound | None) -> float:
        return self.target.key(getattr(bound, self.target.metric)) if bound is not None else 0.0

    def _why_not_planned(self, gpus: int, bound: LayoutBound | None, best: dict) -> tuple[str, str] | None:
        """(status, reason) of a layout left unplanned once `best` met the target at its count, else None."""
        if not self.best_layout:
            return "skipped", f"not planned: {gpus} GPUs already meet {self.target.describe()}"
        if bound is not None and self._bound_key(bound) >= self.target.sort_key(best):
            return "bounded", (f"bound {self.target.format(getattr(bound, self.target.metric))} cannot beat "
                               f"tp{best['tp']} pp{best['pp']}")
        return None

    def _record(self, row: dict) -> dict:
        """Journal a planned row as soon as it exists (pruned rows are target-dependent and not journaled)."""
        if "status" not in row:
            self.planned += 1
            if self.journal:
                self.journal.append(row)
            self.known[row["key"]] = row
        return row

    def _with_status(self, row: dict) -> dict:
        if "status" not in row:
            row = dict(row, status="infeasible" if not row["feasible"] else "over-hbm" if not row["fits_hbm"]
                       else "meets" if self.target.met(row) else "misses")
        return row

    def _unplanned(self, cfg: Config, bound: LayoutBound | None, status: str, reason: str) -> dict:
        row = _base_row(Point(cfg, self.strategy))
        row.update(feasible=None, status=status, reason=reason, lower_bound_s=bound.step_time_s if bound else None)
        return row


def _pruned_row(point: Point, cm: CostModel, bound: LayoutBound, target: Target, term: str) -> dict:
    row = _base_row(point)
    row.update(hdp=cm.setup.hdp, recompute=cm.setup.training.recompute, capacity_tokens=cm.capacity_tokens,
               lower_bound_s=bound.step_time_s, feasible=None, status="pruned",
               reason=f"lower bound {bound.step_time_s:.3g} s/step ({term}) cannot reach {target.describe()}")
    return row


def _decide_layout(cfg: Config, strategy: str, target: Target, prune: bool) -> dict:
    """Plan one layout unless its full lower bound misses the target (then a 'pruned' row). Runs in workers."""
    point = Point(cfg, strategy)
    if prune:
        cm = cost_model_of(cfg)  # the caller built it already: it does not fail
        bound = layout_bound(cm, batches_of(cfg))
        if not target.reachable(bound):
            return _pruned_row(point, cm, bound, target, "the longest sequence at its best degree")
    return evaluate_point(point)


class _LayoutRunner:
    """Runs `_decide_layout` on tasks in their given order: here when a result is asked for, or in a pool
    keeping up to `ahead` tasks running, so the next ones are planned while the awaited one finishes. Each row
    goes to `on_done` (the journal) as soon as it exists, whatever order they finish in."""

    def __init__(self, pool: ProcessPoolExecutor | None, ahead: int, on_done: Callable[[dict], dict]) -> None:
        self.pool, self.ahead, self.on_done = pool, max(1, ahead), on_done
        self.queued: dict[str, tuple] = {}  # point key -> task, in order, not submitted yet
        self.running: dict[str, Future] = {}
        self.rows: dict[str, dict] = {}

    def start(self, tasks: list[tuple]) -> None:
        self.queued = {Point(t[0], t[1]).key: t for t in tasks}
        self._top_up()

    def busy(self) -> int:
        return len(self.running)

    def drop(self, key: str) -> None:
        """The task is no longer needed: never start it (if it runs, its row is still journaled)."""
        self.queued.pop(key, None)
        f = self.running.get(key)
        if f is not None and f.cancel():
            del self.running[key]

    def result(self, key: str) -> dict:
        if self.pool is None:
            return self.on_done(_decide_layout(*self.queued.pop(key)))
        while key not in self.rows:
            if key not in self.running:
                self.running[key] = self.pool.submit(_decide_layout, *self.queued.pop(key))
            wait(list(self.running.values()), return_when=FIRST_COMPLETED)
            self._collect()
            self._top_up()
        return self.rows.pop(key)

    def stop(self) -> None:
        """Cancel tasks not started, keep the rows of those that finished; the pool's owner ends the rest."""
        self.queued.clear()
        for f in self.running.values():
            f.cancel()
        self._collect()

    def _collect(self) -> None:
        for k, f in list(self.running.items()):
            if f.done():
                del self.running[k]
                if not f.cancelled():
                    self.rows[k] = self.on_done(f.result())

    def _top_up(self) -> None:
        while self.pool is not None and self.queued and len(self.running) < self.ahead:
            key = next(iter(self.queued))
            self.running[key] = self.pool.submit(_decide_layout, *self.queued.pop(key))


# ---- ByteScale reproduction grid ----------------------------------------------------------------------
Layout = tuple[int, int]  # (tp, pp)


@dataclass(frozen=True)
class ReproPanel:
    """One ByteScale §8.2 panel: a model at the paper's GPU count. The paper hides TP/PP, so each panel
    lists candidate layouts; the one where the static baseline is fastest is used for every strategy."""

    model: str
    paper_gpus: int  # ByteScale §8.1-8.2 (">12K" for 8x22B read as 12,288)
    balance: str  # "DP-Balance" (HDP+TP) or "PP-Balance" (HDP+TP+PP), ByteScale §8.2
    layouts: tuple[Layout, ...]  # candidate (tp, pp)


_TP_ONLY = tuple((tp, 1) for tp in (1, 2, 4, 8))
_TP_PP = tuple((tp, pp) for tp in (4, 8) for pp in (2, 4, 8))
BYTESCALE_PANELS: tuple[ReproPanel, ...] = (
    ReproPanel("llama-7b", 1024, "DP-Balance", _TP_ONLY),
    ReproPanel("llama-13b", 2048, "DP-Balance", _TP_ONLY),
    ReproPanel("llama-30b", 4096, "DP-Balance", _TP_ONLY),
    ReproPanel("llama-70b", 8192, "PP-Balance", _TP_PP),
    ReproPanel("mistral-8x7b", 8192, "PP-Balance", _TP_PP),
    ReproPanel("mistral-8x22b", 12288, "PP-Balance", _TP_PP),
)
BYTESCALE_LAYOUT_NOTE = ("ByteScale hides its GPU type and TP/PP degrees. We use H100 80 GB nodes (dgx-h100) and, per "
                         "model, the layout where the static baseline is fastest at the largest context on "
                         "github-like (a tuned baseline, as MegaScale's would be), among TP 1/2/4/8 for the HDP+TP "
                         "models and TP 4/8 x PP 2/4/8 for the HDP+TP+PP ones; all strategies use that layout.")
BYTESCALE_STRATEGIES = ("static", "hdp-naive", "hdp")


@dataclass(frozen=True)
class ByteScaleGrid:
    """The ByteScale §8.2 grid: models at the paper's GPU counts (× gpu_scale, whole nodes and tp·pp
    groups), contexts 256K-2M, github-like and byted-like, static / hdp-naive / hdp."""

    gpu_scale: float = 1.0
    tokens_per_step: int = BYTESCALE_TOKENS_PER_STEP
    steps: int = 2
    seed: int = 0
    cluster: str = "dgx-h100"
    panels: tuple[ReproPanel, ...] = BYTESCALE_PANELS
    contexts_tokens: tuple[int, ...] = tuple(2**k * 256 * 2**10 for k in range(4))
    lengths: tuple[str, ...] = ("github-like", "byted-like")

    def config(self, panel: ReproPanel, layout: Layout, context_tokens: int, lengths: str) -> Config:
        tp, pp = layout
        unit = math.lcm(load_cluster(self.cluster).gpus_per_node, tp * pp)
        gpus = max(unit, int(round(panel.paper_gpus * self.gpu_scale / unit)) * unit)
        return Config(panel.model, self.cluster, gpus, tp, pp, context_tokens, lengths, self.tokens_per_step,
                      self.steps, self.seed)

    def tuning_points(self) -> list[Point]:
        """Static at the largest context on github-like for every candidate layout."""
        return [Point(self.config(p, lay, max(self.contexts_tokens), "github-like"), "static")
                for p in self.panels for lay in p.layouts]

    def choose_layouts(self, tuning: pd.DataFrame) -> dict[str, Layout]:
        """Per model, the candidate with the highest static tokens/s that fits (else the first candidate)."""
        ok = tuning[tuning["feasible"] & tuning["fits_hbm"].fillna(False).astype(bool)]
        out = {}
        for p in self.panels:
            g = ok[ok["model"] == p.model]
            out[p.model] = (tuple(int(x) for x in g.loc[g["tokens_per_s"].idxmax(), ["tp", "pp"]]) if len(g)
                            else p.layouts[0])
        return out

    def points(self, layouts: dict[str, Layout]) -> list[Point]:
        return [Point(self.config(p, layouts[p.model], ctx, ln), s)
                for p in self.panels for ctx in self.contexts_tokens for ln in self.lengths
                for s in BYTESCALE_STRATEGIES]


def default_bytescale_table() -> Path:
    """Where `meshplan whatif reproduce` keeps its table and journal unless told (outside the repo)."""
    return Path(tempfile.gettempdir()) / "meshplan-bytescale" / "bytescale.csv"


# ByteScale §8.2 claims (REFERENCE §10) the reproduction is compared against.
BYTESCALE_CLAIMS = {
    "max_github": 7.89,  # max speedup over the static mesh, GitHub, 2M
    "dp_balance_github_2m": (6.21, 7.89),  # LLaMA-7B/13B/30B (HDP+TP), GitHub, 2M
    "max_byted": 4.26,  # max speedup, Byted
    "pp_balance_github_2m": (3.42, 4.28),  # LLaMA-70B, Mistral-8x7B/8x22B (HDP+TP+PP), GitHub, 2M
    "per_doubling": {"static": 2.0, "hdp-naive": 1.23, "hdp": 1.08},  # slowdown per context doubling
}


def per_doubling_slowdown(df: pd.DataFrame) -> pd.DataFrame:
    """Geometric-mean step-time ratio per context doubling (smallest to largest context) of each
    (model, lengths, strategy), on feasible rows; ByteScale §8.2 reads ≈2× / 1.23× / 1.08×."""
    out = []
    ok = df[df["feasible"]]
    for (m, ln, s), g in ok.groupby(["model", "lengths", "strategy"], sort=False):
        g = g.sort_values("context_tokens")
        if len(g) < 2:
            continue
        doublings = math.log2(g["context_tokens"].iloc[-1] / g["context_tokens"].iloc[0])
        ratio = g["step_time_s"].iloc[-1] / g["step_time_s"].iloc[0]
        out.append({"model": m, "lengths": ln, "strategy": s, "per_doubling": ratio ** (1 / doublings)})
    return pd.DataFrame(out, columns=["model", "lengths", "strategy", "per_doubling"])


__all__ = ["BYTESCALE_CLAIMS", "BYTESCALE_PANELS", "BYTESCALE_TOKENS_PER_STEP", "ByteScaleGrid", "CAPACITY_STATUSES",
           "CapacityProgress", "CapacityResult", "Config", "Journal", "LayoutBound", "LayoutRules", "MFU_CONVENTION",
           "Point", "ReproPanel", "SWEEP_COLUMNS", "SweepResult", "SweepSpec", "Target", "capacity_search",
           "code_fingerprint", "default_capacity_table", "evaluate_point", "journal_path", "json_row", "layout_bound",
           "options_for", "per_doubling_slowdown", "progress_bar", "read_table", "run_sweep", "stop_pool",
           "worker_pool", "write_table"]

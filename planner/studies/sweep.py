"""What-if sweeps: points (a config and a strategy), their evaluation, and the resumable sweep over them.

A *config* is one planning case (model, cluster, GPUs, TP/PP, max context, length source, tokens
per step, steps, seed); a *point* is a config and a strategy. Each point is planned over `steps`
sampled global batches and simulated through planner.api, giving one row of the sweep table
(SWEEP_COLUMNS). A point that cannot be planned (model states do not fit, context too long for the
mesh, invalid layout) keeps its row with feasible=False and the one-line reason; so does a point where
a strategy raised anything else ("planner error (Type): ..."), a bug that should not sink a sweep.
Finished rows are journaled (planner.studies.journal), so an interrupted sweep resumes.

Static baseline: a static job must size its CP degree before it sees the data, so by default the
static mesh holds the sweep's max context (ByteScale §3: d_cp = S_max / C), not the longest
sequence of each sampled batch (`static_mesh="batch"`, what `meshplan plan` does). Speedups are
step-time ratios against that static plan of the same config.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, get_args

import pandas as pd

from costmodel.presets import load_cluster, load_model
from costmodel.specs import (ATTENTION_KERNELS, FP8_RECIPES, GRAD_ACCUMULATIONS, LOSS_KERNELS, MOE_DISPATCHERS,
                             OPTIMIZER_MOMENTS, TRAIN_DTYPES, Setup, SpecError, TrainingSpec)
from costmodel.timing import CostModel
from planner.api import BYTESCALE_TOKENS_PER_STEP, PlanRequest, build_cost_model, make_batches, make_plan, summarize
from planner.plan import PlanError
from planner.strategies import STRATEGIES, PlanOptions, StaticOptions
from planner.strategies.static import static_cp_degree
from planner.studies.fingerprint import code_fingerprint
from planner.studies.journal import SWEEP_COLUMNS, Journal, first_line, journal_path, rows_to_frame, write_table
from planner.studies.workers import worker_pool
from planner.workload import GlobalBatch, SourceError, format_tokens, open_source
from profiles.table import Profile, ProfileError, load_profile

# Errors that make one point infeasible (its row says why); anything else is a bug and propagates.
POINT_ERRORS: tuple[type[Exception], ...] = (SpecError, PlanError, SourceError, ProfileError)

StaticMesh = Literal["context", "batch"]
STATIC_MESHES: tuple[str, ...] = get_args(StaticMesh)


@dataclass(frozen=True)
class TrainingFlags:
    """How every point of a study trains beyond what the study varies: PlanRequest's fields of the same names, with
    its defaults (bf16, NCCL all-to-alls, nothing overlapped but what the simulator always overlaps)."""

    dtype: str = "bf16"  # PlanRequest.dtype: bf16, fp16, fp32, or fp8 (fp8 GEMMs)
    fp8_recipe: str | None = None  # PlanRequest.fp8_recipe (None: Transformer Engine's for the GPU)
    moe_capacity_factor: float = 1.0  # PlanRequest.moe_capacity_factor
    moe_grouped_gemm: bool = False  # PlanRequest.moe_grouped_gemm
    moe_dispatcher: str = "alltoall"  # PlanRequest.moe_dispatcher
    ep_comm_overlap: bool = False  # PlanRequest.ep_comm_overlap
    tp_comm_overlap: bool = False  # PlanRequest.tp_comm_overlap
    sequence_parallel: bool = True  # PlanRequest.sequence_parallel (Megatron's SP with TP)
    overlap_grad_reduce: bool = False  # PlanRequest.overlap_grad_reduce
    overlap_param_gather: bool = False  # PlanRequest.overlap_param_gather
    fp8_param_gather: bool = False  # PlanRequest.fp8_param_gather
    mtp_layers: int = 0  # PlanRequest.mtp_layers
    optimizer_moments: str = "fp32"  # PlanRequest.optimizer_moments

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # one type per field (2 and 2.0 key alike; 1 reads as a switch)
            value = getattr(self, f.name)
            if f.default is not None and value is not None and type(value) is not type(f.default):
                try:
                    object.__setattr__(self, f.name, type(f.default)(value))
                except (TypeError, ValueError):
                    raise PlanError(f"{f.name} cannot be {value!r}") from None
        for name, value, choices in (("dtype", self.dtype, TRAIN_DTYPES),
                                     ("moe_dispatcher", self.moe_dispatcher, MOE_DISPATCHERS),
                                     ("optimizer_moments", self.optimizer_moments, OPTIMIZER_MOMENTS)):
            if value not in choices:
                raise PlanError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if self.fp8_recipe is not None and self.fp8_recipe not in FP8_RECIPES:
            raise PlanError(f"fp8_recipe must be one of {', '.join(FP8_RECIPES)}, got {self.fp8_recipe!r}")

    def changed(self) -> dict[str, object]:
        """The fields that differ from the defaults, in field order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}

    @property
    def label(self) -> str:
        """The non-default flags as people read them, e.g. "dtype fp8, moe_dispatcher flex" ("" for none); a
        switch turned on reads as its name, one turned off as "name False"."""
        return ", ".join(k if v is True else f"{k} {v}" for k, v in self.changed().items())

    @classmethod
    def parse(cls, label: str | None) -> TrainingFlags:
        """The flags a row's `training` column (`label`) names; PlanError for a name or value it cannot hold."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, object] = {}
        for part in filter(None, (x.strip() for x in (label or "").split(","))):
            name, _, text = part.partition(" ")
            f = fields.get(name)
            if f is None:
                raise PlanError(f"training flags {label!r}: unknown flag {name!r}; one of {', '.join(fields)}")
            kind = type(f.default) if f.default is not None else str
            try:  # a switch reads as its name when on, "name False" when off
                values[name] = {"": True, "False": False}[text] if kind is bool else kind(text)
            except (KeyError, ValueError):
                raise PlanError(f"training flags {label!r}: {name} cannot be {text!r}") from None
        return cls(**values)


NO_FLAGS = TrainingFlags()


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
    ep: int = 1  # MoE expert parallelism inside the TP group (TrainingSpec.ep)
    zero_stage: int = 1  # ZeRO stage over the HDP ranks of a stage (TrainingSpec.zero_stage)
    attention_kernel: str = "flash"  # TrainingSpec.attention_kernel: the profile's table or a published kernel
    loss: str = "online"  # TrainingSpec.loss
    grad_accumulation: str = "fused"  # TrainingSpec.grad_accumulation (sweeps price fused kernels: Megatron-core's)
    recompute_modules: str = ""  # Megatron-core's, a comma list, where recompute is (or auto picks) selective
    flags: TrainingFlags = NO_FLAGS  # precision, MoE dispatch and overlaps

    @property
    def key(self) -> str:
        """Deterministic, human-readable identity of the config (journal key prefix; ep only when set, so
        journals written before it resume)."""
        return (f"{self.model}|{self.cluster}|g{self.gpus}|tp{self.tp}|pp{self.pp}|ctx{self.context_tokens}|"
                f"{self.lengths}|tps{self.tokens_per_step}|steps{self.steps}|seed{self.seed}|rc-{self.recompute}|"
                f"off{int(self.offload)}|static-{self.static_mesh}" + (f"|ep{self.ep}" if self.ep != 1 else "")
                + (f"|zero{self.zero_stage}" if self.zero_stage != 1 else "")  # likewise: ZeRO-1 unmarked
                + (f"|attn-{self.attention_kernel}" if self.attention_kernel != "flash" else "")
                + (f"|loss-{self.loss}" if self.loss != "online" else "")
                + (f"|acc-{self.grad_accumulation}" if self.grad_accumulation != "fused" else "")
                + (f"|rcm-{self.recompute_modules}" if self.recompute_modules else "")
                + "".join(f"|{k}-{v}" for k, v in self.flags.changed().items()))

    def request(self, options: PlanOptions | None = None) -> PlanRequest:
        return PlanRequest(model=self.model, cluster=self.cluster, gpus=self.gpus, tp=self.tp, pp=self.pp, ep=self.ep,
                           lengths=self.lengths, steps=self.steps, tokens_per_step=self.tokens_per_step,
                           max_context_tokens=self.context_tokens, recompute=self.recompute, seed=self.seed,
                           zero_stage=self.zero_stage, attention_kernel=self.attention_kernel, loss=self.loss,
                           grad_accumulation=self.grad_accumulation,
                           recompute_modules=tuple(self.recompute_modules.split(",")) if self.recompute_modules
                           else None, options=options or PlanOptions(offload=self.offload, seed=self.seed),
                           **dataclasses.asdict(self.flags))


@dataclass(frozen=True)
class Point:
    config: Config
    strategy: str

    @property
    def key(self) -> str:
        return f"{self.config.key}|{self.strategy}"

    @property
    def label(self) -> str:
        """Short description for progress displays, e.g. 'llama-7b 256 GPUs 1M byted-like hdp'."""
        c = self.config
        return f"{c.model} {c.gpus} GPUs {format_tokens(c.context_tokens)} {c.lengths} {self.strategy}"


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
    ep: int = 1  # MoE: the most expert parallelism; each config takes min(ep, tp)
    zero_stages: tuple[int, ...] = (1,)  # ZeRO stages
    attention_kernels: tuple[str, ...] = ("flash",)  # attention kernels, innermost of the configs
    loss: str = "online"  # every config's (Config.loss)
    grad_accumulation: str = "fused"  # every config's (Config.grad_accumulation)
    recompute_modules: str = ""  # every config's (Config.recompute_modules)
    flags: TrainingFlags = NO_FLAGS  # every config's (Config.flags)

    def configs(self) -> list[Config]:
        return [Config(m, c, g, t, p, ctx, ln, self.tokens_per_step, self.steps, self.seed, self.recompute,
                       self.offload, self.static_mesh, ep=min(self.ep, t), zero_stage=z, attention_kernel=k,
                       loss=self.loss, grad_accumulation=self.grad_accumulation,
                       recompute_modules=self.recompute_modules, flags=self.flags)
                for m, c, g, t, p, ctx, ln, z, k in itertools.product(
                    self.models, self.clusters, self.gpus, self.tps, self.pps, self.contexts_tokens, self.lengths,
                    self.zero_stages, self.attention_kernels)]

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
    for m in sorted({p.config.static_mesh for p in pts} - set(STATIC_MESHES)):
        raise PlanError(f"static mesh must be {' or '.join(STATIC_MESHES)}, got {m!r}")
    for x in sorted({p.config.loss for p in pts} - set(LOSS_KERNELS)):
        raise PlanError(f"loss must be one of {', '.join(LOSS_KERNELS)}, got {x!r}")
    for x in sorted({p.config.grad_accumulation for p in pts} - set(GRAD_ACCUMULATIONS)):
        raise PlanError(f"gradient accumulation must be one of {', '.join(GRAD_ACCUMULATIONS)}, got {x!r}")
    for a, z in sorted({(p.config.grad_accumulation, p.config.zero_stage) for p in pts}):
        try:  # TrainingSpec's own rule, once for the sweep rather than a failed row per point
            TrainingSpec(zero_stage=z, grad_accumulation=a)
        except SpecError:
            raise PlanError(f"gradient accumulation {a!r} with ZeRO-{z} is not modelled (sharded gradients are "
                            "reduce-scattered, not accumulated whole); sweep --zero 0,1 with it, or leave it fused"
                            ) from None
    modules = {(p.config.recompute_modules, p.config.recompute) for p in pts if p.config.recompute_modules}
    for mods, rc in sorted(modules):  # the specs' own rules (names, policy), once for the sweep
        TrainingSpec(recompute="selective", recompute_modules=tuple(mods.split(",")))
        PlanRequest(recompute=rc, recompute_modules=tuple(mods.split(",")))
    _check_flags({p.config for p in pts})
    for c, k in sorted({(p.config.cluster, p.config.attention_kernel) for p in pts}):
        if k not in ATTENTION_KERNELS:
            raise PlanError(f"attention kernel must be one of {', '.join(ATTENTION_KERNELS)}, got {k!r}")
        if k not in ("flash", "unfused"):  # a published kernel: its cluster's profile must have its rates
            _profile(load_cluster(c).profile).attention_kernel_time_x(k, 1.0)


def _probe_setup(c: Config, flags: TrainingFlags) -> Setup:
    """The config's model, cluster and training with `flags`, as the specs check them (auto's recompute as none,
    or as selective where it names modules: resolve_setup checks those whichever policy auto keeps)."""
    rc = c.recompute if c.recompute != "auto" else "selective" if c.recompute_modules else "none"
    modules = tuple(c.recompute_modules.split(",")) if c.recompute_modules and rc == "selective" else None
    tr = TrainingSpec(tp=c.tp, pp=c.pp, ep=c.ep, zero_stage=c.zero_stage, attention_kernel=c.attention_kernel,
                      recompute=rc, recompute_modules=modules, loss=c.loss, grad_accumulation=c.grad_accumulation,
                      **dataclasses.asdict(flags))
    return Setup(load_model(c.model), load_cluster(c.cluster).with_gpus(c.gpus), tr)


def _check_flags(configs: set[Config]) -> None:
    """Training flags no config can train with fail once, with the specs' reason (e.g. --ep-comm-overlap where every
    layout has ep 1, --moe-grouped-gemm on dense models), as does fp8 where no cluster's profile has fp8 GEMMs.
    Configs that fail without the flags too (a layout the model does not take) are not the flags' doing, and flags
    that fit some configs only leave the others' rows infeasible with the reason."""
    for flags in {c.flags for c in configs} - {NO_FLAGS}:
        mine = sorted((c for c in configs if c.flags == flags), key=lambda c: c.key)
        first: SpecError | None = None
        for c in mine:
            try:
                _probe_setup(c, NO_FLAGS)
            except SpecError:
                continue
            try:
                _probe_setup(c, flags)
                break
            except SpecError as e:
                first = first or e
        else:
            if first is not None:
                raise PlanError(f"no layout of the study trains with {flags.label}: {first}")
        if flags.dtype == "fp8" and not any("fp8" in set(_profile(load_cluster(x).profile).tables["gemm"]["dtype"])
                                            for x in {c.cluster for c in mine}):
            raise PlanError("dtype fp8: no cluster of the study has fp8 GEMMs in its profile (GPUs before Hopper "
                            "have no fp8 tensor cores); sweep bf16 there")


# ---- evaluation (cached across points of one process) -------------------------------------------
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
    static = StaticOptions()
    if strategy == "static" and config.static_mesh == "context":
        static = StaticOptions(cp=static_cp_degree(config.context_tokens, cm.capacity_tokens, cm.setup.hdp))
    return PlanOptions(offload=config.offload, seed=config.seed, static=static)


def base_row(point: Point) -> dict:
    """The row of a point before it is planned: its inputs, the code fingerprint, feasible=False."""
    c = point.config
    row = {k: None for k in SWEEP_COLUMNS}
    row.update(key=point.key, model=c.model, cluster=c.cluster, gpus=c.gpus, tp=c.tp, pp=c.pp, ep=c.ep,
               context_tokens=c.context_tokens, lengths=c.lengths, tokens_per_step=c.tokens_per_step,
               strategy=point.strategy, steps=c.steps, seed=c.seed, offload=c.offload, static_mesh=c.static_mesh,
               recompute=c.recompute, zero_stage=c.zero_stage, attention_kernel=c.attention_kernel, loss=c.loss,
               grad_accumulation=c.grad_accumulation, recompute_modules=c.recompute_modules,
               training=c.flags.label, code_sha256=code_fingerprint(point.strategy), feasible=False)
    return row


def priced_fields(cm: CostModel) -> dict:
    """A row's fields as its cost model priced them (auto's recompute resolved, modules where it kept selective)."""
    tr = cm.setup.training
    return {"hdp": cm.setup.hdp, "recompute": tr.recompute, "recompute_modules": ",".join(tr.recompute_modules or ()),
            "capacity_tokens": cm.capacity_tokens}


def evaluate_point(point: Point, static_step_time_s: float | None = None) -> dict:
    """Plan and simulate one point; a row of SWEEP_COLUMNS (infeasible: feasible=False and the reason).
    `static_step_time_s`: the config's static step time, the reference of speedup_vs_static."""
    row = base_row(point)
    c = point.config
    try:
        cm = cost_model_of(c)
        row.update(priced_fields(cm), profile=cm.profile.fingerprint.name,
                   profile_sha256=cm.profile.fingerprint.sha256)
        req = c.request(options_for(c, point.strategy, cm))
        plan = make_plan(req, point.strategy, cm, batches_of(c))
    except POINT_ERRORS as e:
        row["reason"] = first_line(e)
        return row
    except Exception as e:  # a planner bug must not sink a whole sweep; the row names it
        row["reason"] = f"planner error ({type(e).__name__}): {first_line(e)}"
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

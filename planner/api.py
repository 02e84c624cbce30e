"""One entry point for the CLI, benchmarks and what-if sweeps: build the cost model of a request,
plan its steps with a strategy, validate, and summarise (tokens/s, MFU, speedup vs static)."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from costmodel.flops import model_flops
from costmodel.memory import memory_budget
from costmodel.presets import load_cluster, load_model
from costmodel.specs import Setup, SpecError, TrainingSpec
from costmodel.timing import CostModel
from planner.batch import GlobalBatch, global_batches
from planner.plan import Mesh, Plan, PlanError, validate
from planner.strategies import PlanOptions, get_strategy
from planner.strategies.ilp import collect_solver_reports, solver_meta
from profiles.table import load_profile

BYTESCALE_TOKENS_PER_STEP = 32 * 2**20  # ByteScale §8.1: 32M tokens per step


@dataclass(frozen=True)
class PlanRequest:
    """Everything that defines a planning case (the CLI's flags)."""

    model: str = "llama-7b"
    cluster: str = "dgx-h100"
    gpus: int | None = 64  # None: the preset's size
    tp: int = 1
    pp: int = 1
    profile: str | None = None  # None: the cluster preset's profile
    lengths: str = "byted-like"  # length source spec (planner.sources)
    steps: int = 1
    tokens_per_step: int = BYTESCALE_TOKENS_PER_STEP
    max_context_tokens: int = 2 * 2**20
    recompute: str = "auto"  # none | selective | full | auto (least recompute that fits the max context)
    capacity_tokens: int | None = None  # override C
    zero_stage: int = 1
    seed: int = 0
    options: PlanOptions = field(default_factory=PlanOptions)


def resolve_setup(req: PlanRequest) -> Setup:
    model = load_model(req.model)
    cluster = load_cluster(req.cluster)
    if req.gpus is not None:
        cluster = cluster.with_gpus(req.gpus)
    policies = ["none", "selective", "full"] if req.recompute == "auto" else [req.recompute]
    last: Exception | None = None
    for pol in policies:
        tr = TrainingSpec(tp=req.tp, pp=req.pp, recompute=pol, zero_stage=req.zero_stage,
                          capacity_tokens=req.capacity_tokens)
        try:
            setup = Setup(model, cluster, tr)
            cap = memory_budget(setup).capacity_tokens
        except SpecError as e:
            last = e
            continue
        # 'auto' keeps the first policy under which a static mesh can shard the longest sequence.
        if req.recompute != "auto" or cap * setup.hdp >= req.max_context_tokens or pol == "full":
            return setup
    raise last if last else SpecError("no training setup fits")


def build_cost_model(req: PlanRequest) -> CostModel:
    setup = resolve_setup(req)
    return CostModel(setup, load_profile(req.profile or setup.cluster.profile))


def make_batches(req: PlanRequest) -> list[GlobalBatch]:
    return global_batches(req.lengths, tokens_per_step=req.tokens_per_step, max_context_tokens=req.max_context_tokens,
                          steps=req.steps, seed=req.seed)


def _tool_version() -> str:
    try:
        return version("meshplan")
    except PackageNotFoundError:
        return "0+unknown"


def make_plan(req: PlanRequest, strategy: str, cm: CostModel | None = None,
              batches: list[GlobalBatch] | None = None) -> Plan:
    """Plan every step of the request with one strategy; the plan is validated before it is returned."""
    cm = cm or build_cost_model(req)
    batches = batches if batches is not None else make_batches(req)
    fn = get_strategy(strategy)
    t0 = time.perf_counter()
    with collect_solver_reports() as reports:  # exact strategies report status and gap per step
        steps = [fn(b, cm, req.options) for b in batches]
        chunkings = {int((st.pipeline or {}).get("v", 1)) for st in steps}
        if len(chunkings) > 1:
            steps = _one_chunking(fn, batches, cm, req.options, chunkings)
    secs = time.perf_counter() - t0
    s = cm.setup
    fp = cm.profile.fingerprint
    meta = {
        "tool_version": _tool_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": s.model.name, "cluster": s.cluster.name, "gpus": s.cluster.world_size,
        "profile": {"name": fp.name, "source": fp.source, "sha256": fp.sha256},
        "strategy": strategy,
        "options": {**json.loads(json.dumps(dataclasses.asdict(req.options))), "lengths": req.lengths, "tokens_per_step": req.tokens_per_step,
                    "max_context_tokens": req.max_context_tokens, "steps": req.steps},
        "solver": solver_meta(reports, strategy, secs),
        "seed": req.seed,
        "training": s.training.to_dict(),
        "model_spec": dataclasses.asdict(s.model),
        "cluster_spec": dataclasses.asdict(s.cluster),
        "capacity_tokens": cm.capacity_tokens,
        "layers_per_stage": cm.layers_per_stage,
        "dkv_activation_ratio": cm.dkv_ratio,
        "split_documents": int(sum(b.split_documents for b in batches)),
    }
    plan = Plan(meta=meta, mesh=Mesh(world_size=s.cluster.world_size, tp=s.training.tp, pp=s.training.pp, hdp=s.hdp),
                steps=steps)
    validate(plan)
    return plan


def _one_chunking(fn, batches: list[GlobalBatch], cm: CostModel, options: PlanOptions, chunkings: set[int]) -> list:
    """Steps chose different interleaving depths v, but a run places its layers once: re-plan every
    step with each v some step chose and keep the v with the least total step time among those whose
    every step fits HBM (the least peak memory when none does)."""
    best = None
    for v in sorted(chunkings):
        steps = [fn(b, cm, dataclasses.replace(options, pp_v=v)) for b in batches]
        peak = max(max(st.predicted.peak_memory_bytes) for st in steps)
        key = (peak > cm.budget.hbm_bytes, sum(st.predicted.step_time_s for st in steps) if peak <= cm.budget.hbm_bytes
               else peak)
        if best is None or key < best[0]:
            best = (key, steps)
    return best[1]


def cost_model_for_plan(plan: Plan, profile: str | None = None) -> CostModel:
    """The cost model a plan was made with (specs from its meta), optionally on another profile."""
    from costmodel.specs import ClusterSpec, ModelSpec

    m = plan.meta
    try:
        model = ModelSpec.from_dict(m["model_spec"])
        cluster = ClusterSpec.from_dict(m["cluster_spec"])
        training = TrainingSpec(**m["training"])
    except KeyError as e:
        raise PlanError(f"plan meta lacks {e}; re-create the plan with `meshplan plan`") from None
    setup = Setup(model, cluster, training)
    cm = CostModel(setup, load_profile(profile or m.get("profile", {}).get("name") or cluster.profile))
    if (setup.hdp, training.pp, training.tp) != (plan.mesh.hdp, plan.mesh.pp, plan.mesh.tp):
        raise PlanError("plan mesh does not match its own meta (edited plan?)")
    return cm


@dataclass(frozen=True)
class Summary:
    """Per-strategy figures averaged over the plan's steps."""

    strategy: str
    step_time_s: float
    lower_bound_s: float
    tokens_per_s: float
    mfu: float  # causal attention halved, recompute excluded (primary convention)
    mfu_unhalved: float  # PaLM / Megatron convention: causal attention counted in full
    speedup_vs_static: float | None
    busiest_rank_s: float
    idlest_rank_s: float
    peak_memory_bytes: float
    planning_s: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarize(plan: Plan, cm: CostModel, static_step_time_s: float | None = None) -> Summary:
    st = plan.steps
    step_time = float(np.mean([s.predicted.step_time_s for s in st]))
    lb = float(np.mean([s.predicted.lower_bound_s for s in st]))
    tokens = float(np.mean([s.global_tokens for s in st]))
    world = cm.setup.cluster.world_size
    peak = cm.peak_flops()
    f_half = float(np.mean([model_flops([q.length for q in s.sequences], cm.model, True) for s in st]))
    f_full = float(np.mean([model_flops([q.length for q in s.sequences], cm.model, False) for s in st]))
    busy = np.array([s.predicted.per_rank_busy_s for s in st]).mean(axis=0)
    return Summary(
        strategy=plan.meta["strategy"], step_time_s=step_time, lower_bound_s=lb, tokens_per_s=tokens / step_time,
        mfu=f_half / (step_time * world * peak), mfu_unhalved=f_full / (step_time * world * peak),
        speedup_vs_static=(static_step_time_s / step_time) if static_step_time_s else None,
        busiest_rank_s=float(busy.max()), idlest_rank_s=float(busy.min()),
        peak_memory_bytes=float(max(max(s.predicted.peak_memory_bytes) for s in st)),
        planning_s=float(plan.meta["solver"]["seconds"]))


@dataclass
class Comparison:
    plans: dict[str, Plan]
    summaries: list[Summary]
    failures: dict[str, str]  # strategy -> reason it could not plan
    cost_model: CostModel
    batches: list[GlobalBatch]


def compare(req: PlanRequest, strategies: list[str], progress=None) -> Comparison:
    """Plan the same batches with several strategies on one cost model; speedups are vs static."""
    cm = build_cost_model(req)
    batches = make_batches(req)
    plans: dict[str, Plan] = {}
    failures: dict[str, str] = {}
    for name in strategies:
        try:
            plans[name] = make_plan(req, name, cm, batches)
        except PlanError as e:
            failures[name] = str(e)
        if progress:
            progress(name)
    static_t = None
    if "static" in plans:
        static_t = float(np.mean([s.predicted.step_time_s for s in plans["static"].steps]))
    sums = [summarize(p, cm, static_t) for p in plans.values()]
    return Comparison(plans, sums, failures, cm, batches)

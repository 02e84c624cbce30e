"""One entry point for the CLI, benchmarks and what-if sweeps: build the cost model of a request,
plan its steps with a strategy, validate, and summarise (tokens/s, MFU, speedup vs static)."""

from __future__ import annotations

import dataclasses
import json
import re
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import numpy as np

from costmodel.flops import training_flops
from costmodel.memory import memory_budget
from costmodel.presets import load_cluster, load_model
from costmodel.specs import (AUTO_RECOMPUTE, RECOMPUTE_POLICIES, ClusterSpec, Setup, SpecError, TrainingSpec,
                             check_recompute)
from costmodel.timing import CostModel
from planner.workload import GlobalBatch, global_batches
from planner.plan import Mesh, Plan, PlanError, validate
from planner.strategies import PlanOptions, get_strategy, run_strategy, solver_meta
from planner.strategies.common import fits_first
from profiles.measure import cpu_device_name, cpu_vector_isa
from profiles.table import Profile, ProfileError, load_profile, profile_names

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
    lengths: str = "byted-like"  # length source spec (planner.workload)
    steps: int = 1
    tokens_per_step: int | None = None  # None ("auto"): sized from the mesh, see auto_tokens_per_step
    max_context_tokens: int = 2 * 2**20
    recompute: str = AUTO_RECOMPUTE  # a policy, or auto: the least recompute that fits the max context
    # Megatron-core's recompute modules for the selective policy (TrainingSpec.recompute_modules; None: meshplan's)
    recompute_modules: tuple[str, ...] | None = None
    capacity_tokens: int | None = None  # override C
    zero_stage: int = 1
    dtype: str = "bf16"  # training precision, TrainingSpec.dtype: bf16, fp16, fp32, or fp8 (fp8 GEMMs, bf16 storage)
    kernels: str = "fused"  # elementwise kernels, TrainingSpec.kernels: fused (Megatron) or eager (meshplan replay)
    ep: int = 1  # MoE expert parallelism inside the TP group, TrainingSpec.ep
    moe_capacity_factor: float = 1.0  # MoE routing imbalance, TrainingSpec.moe_capacity_factor
    moe_grouped_gemm: bool = False  # MoE: a rank's local experts in one grouped GEMM, TrainingSpec.moe_grouped_gemm
    moe_dispatcher: str = "alltoall"  # MoE: how tokens travel over EP, TrainingSpec.moe_dispatcher
    ep_comm_overlap: bool = False  # MoE: EP all-to-alls under the other micro-batch's compute, TrainingSpec's
    fp8_recipe: str | None = None  # --dtype fp8's scaling recipe, TrainingSpec.fp8_recipe (None: TE's for the GPU)
    tp_comm_overlap: bool = False  # TrainingSpec.tp_comm_overlap (Megatron-core's userbuffer TP overlap)
    sequence_parallel: bool = True  # TrainingSpec.sequence_parallel (Megatron's SP with TP; the replay runs without)
    overlap_grad_reduce: bool = False  # TrainingSpec.overlap_grad_reduce (Megatron-core DDP)
    overlap_param_gather: bool = False  # TrainingSpec.overlap_param_gather (Megatron-core DDP)
    fp8_param_gather: bool = False  # TrainingSpec.fp8_param_gather (Megatron-LM --fp8-param-gather)
    mtp_layers: int = 0  # TrainingSpec.mtp_layers (Megatron-core --mtp-num-layers)
    optimizer_moments: str = "fp32"  # TrainingSpec.optimizer_moments (bf16: Megatron-core's precision-aware optimizer)
    attention_kernel: str = "flash"  # TrainingSpec.attention_kernel: the profile's table, or a named generation
    loss: str = "online"  # TrainingSpec.loss: how the cross-entropy holds the logits
    grad_accumulation: str | None = None  # TrainingSpec.grad_accumulation (None: the framework's own)
    seed: int = 0
    options: PlanOptions = field(default_factory=PlanOptions)

    def __post_init__(self) -> None:
        check_recompute(self.recompute)
        if self.recompute_modules is not None and self.recompute not in ("selective", AUTO_RECOMPUTE):
            raise SpecError(f"--recompute-modules apply to the selective policy, not --recompute {self.recompute}; "
                            "use --recompute selective (or auto)")


def resolve_setup(req: PlanRequest) -> Setup:
    model = load_model(req.model)
    cluster = load_cluster(req.cluster)
    if req.gpus is not None:
        cluster = cluster.with_gpus(req.gpus)
    policies = RECOMPUTE_POLICIES if req.recompute == AUTO_RECOMPUTE else (req.recompute,)
    if req.recompute == AUTO_RECOMPUTE and req.ep_comm_overlap:  # Megatron-core refuses full recompute with it
        policies = tuple(p for p in policies if p != "full")

    def training(pol: str) -> TrainingSpec:
        modules = req.recompute_modules if pol == "selective" else None
        return TrainingSpec(dtype=req.dtype, tp=req.tp, pp=req.pp, recompute=pol, zero_stage=req.zero_stage,
                            kernels=req.kernels, recompute_modules=modules,
                            capacity_tokens=req.capacity_tokens, ep=req.ep, moe_capacity_factor=req.moe_capacity_factor,
                            moe_grouped_gemm=req.moe_grouped_gemm, moe_dispatcher=req.moe_dispatcher,
                            ep_comm_overlap=req.ep_comm_overlap, fp8_recipe=req.fp8_recipe,
                            tp_comm_overlap=req.tp_comm_overlap, sequence_parallel=req.sequence_parallel,
                            overlap_grad_reduce=req.overlap_grad_reduce,
                            overlap_param_gather=req.overlap_param_gather, fp8_param_gather=req.fp8_param_gather,
                            attention_kernel=req.attention_kernel, mtp_layers=req.mtp_layers, loss=req.loss,
                            grad_accumulation=req.grad_accumulation, optimizer_moments=req.optimizer_moments)

    if req.recompute_modules is not None:  # refused modules fail here, whichever policy auto would keep
        Setup(model, cluster, training("selective"))
    last: Exception | None = None
    for pol in policies:
        tr = training(pol)
        try:
            setup = Setup(model, cluster, tr)
            cap = memory_budget(setup).capacity_tokens
        except SpecError as e:
            last = e
            continue
        # 'auto' keeps the first policy under which a static mesh can shard the longest sequence.
        if req.recompute != AUTO_RECOMPUTE or cap * setup.hdp >= req.max_context_tokens or pol == policies[-1]:
            return setup
    raise last if last else SpecError("no training setup fits")


def build_cost_model(req: PlanRequest, load: Callable[[str], Profile] = load_profile) -> CostModel:
    """The request's cost model on its profile (the cluster preset's unless one is named); warns when
    the profile describes another device than the cluster's. `load`: how a profile is loaded (what-if
    searches share one loaded Profile across many layouts)."""
    setup = resolve_setup(req)
    profile = load(req.profile or setup.cluster.profile)
    warn_device_mismatch(profile, setup.cluster)
    return CostModel(setup, profile)


def device_kind(text: str) -> str | None:
    """'cpu', a GPU model token ('h100', 'a100', 'mi300x', ...), or None when the text names neither.
    A measured GPU profile's device ends in '(host cpu: ...)': only the part before it counts."""
    t = text.lower().split("(host cpu")[0]
    if re.search(r"\bcpu\b", t):
        return "cpu"
    m = re.search(r"\b[a-z]{1,3}\d{2,4}[a-z]?\b", t)
    return m.group(0) if m else None


def warn_device_mismatch(profile: Profile, cluster: ClusterSpec) -> None:
    """A warning (not an error: a stand-in profile is a legitimate study) when the profile was made
    for another device than the cluster's GPU; silent when either name is not recognised."""
    fp = profile.fingerprint
    have, want = device_kind(fp.device), device_kind(cluster.gpu)
    if have and want and have != want:
        warnings.warn(f"profile {fp.name!r} describes {fp.device}, not the "
                      f"{cluster.gpu} of cluster {cluster.name!r}: its times will not predict this cluster "
                      "(measure one there with `meshplan profile`, or pass --profile)", stacklevel=3)
    else:
        warn_cpu_host_mismatch(profile, cluster)


def warn_cpu_host_mismatch(profile: Profile, cluster: ClusterSpec) -> None:
    """A CPU cluster is this host (its ranks are processes here): a warning when its measured profile names
    another CPU or core count than this host's (the shipped local-cpu profile's EPYC on a Xeon host predicted
    steps 33-81% slow, docs/BENCHMARKS.md), or was measured with other vector kernels than torch picks here (a
    virtual CPU's name can hide its generation: the AVX2 EPYC profile shipped until 2026-12-07 priced an AVX-512
    'AMD EPYC' host's replays 43-62% slow)."""
    fp = profile.fingerprint
    if not (device_kind(cluster.gpu) == device_kind(fp.device) == "cpu" and fp.source == "measured"):
        return
    here = cpu_device_name()
    isa, isa_here = fp.versions.get("cpu_capability"), cpu_vector_isa()
    if fp.device != here:
        what = f"was measured on {fp.device.removeprefix('cpu: ')}, this host is {here.removeprefix('cpu: ')}"
    elif isa and isa_here and isa != isa_here:
        what = f"was measured with torch's {isa} CPU kernels, this host runs {isa_here} ones"
    else:
        return
    warnings.warn(f"profile {fp.name!r} {what}: its times will not predict runs here (measure this host with "
                  "`meshplan profile --quick --out FILE` and pass --profile FILE)", stacklevel=4)


def profile_meta(profile: Profile) -> dict:
    """meta.profile of a plan: name, source, sha256, and the file's absolute path when it was a file,
    so `simulate` and `report` find the same profile without --profile."""
    fp = profile.fingerprint
    meta = {"name": fp.name, "source": fp.source, "sha256": fp.sha256}
    return {**meta, "path": profile.path} if profile.path else meta


def _recorded_profile(ref: object, fallback: str) -> Profile:
    """The profile a plan's meta.profile names, which must still hash to the recorded sha256."""
    ref = ref if isinstance(ref, dict) else {}
    path, name, sha = ref.get("path"), str(ref.get("name") or fallback), ref.get("sha256")
    if isinstance(path, str) and path:
        where = path
        if not Path(path).is_file():
            raise ProfileError(f"the plan's profile file {path} is gone; pass --profile PATH (or a shipped name)")
        prof = load_profile(path)
    elif name in profile_names():
        where, prof = name, load_profile(name)
    else:
        raise ProfileError(f"the plan's profile {name!r} is not shipped and the plan records no file for it; "
                           "pass --profile PATH")
    if isinstance(sha, str) and sha and prof.fingerprint.sha256 != sha:
        raise ProfileError(f"profile {where} changed since the plan was made (sha256 {sha[:12]}..., now "
                           f"{prof.fingerprint.sha256[:12]}...); pass --profile {where} to use it as it is now")
    return prof


def auto_tokens_per_step(cm: CostModel, max_context_tokens: int) -> int:
    """The default step budget: one micro-batch on every HDP rank, each a packed row of min(C, max
    context) tokens — what a static mesh sized for the max context holds at once, so the step fits the
    cluster it is planned for (64 H100s, LLaMA-7B, 2M context: 64 × C = 4.5M tokens; 4 CPU ranks, the
    tiny model, 4K context: 16K). Never less than one max-context sequence."""
    return max(max_context_tokens, cm.setup.hdp * min(cm.capacity_tokens, max_context_tokens))


def step_tokens(req: PlanRequest, cm: CostModel | None = None) -> int:
    """The request's token budget per step: its own, or the mesh's default (auto_tokens_per_step)."""
    if req.tokens_per_step is not None:
        return req.tokens_per_step
    return auto_tokens_per_step(cm or build_cost_model(req), req.max_context_tokens)


def make_batches(req: PlanRequest, cm: CostModel | None = None) -> list[GlobalBatch]:
    """The request's global batches; `cm` (the request's cost model) sizes the 'auto' budget."""
    return global_batches(req.lengths, tokens_per_step=step_tokens(req, cm), max_context_tokens=req.max_context_tokens,
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
    batches = batches if batches is not None else make_batches(req, cm)
    fn = get_strategy(strategy)
    t0 = time.perf_counter()
    outcomes = [run_strategy(strategy, b, cm, req.options) for b in batches]  # exact ones: with status and gap
    steps = [o.step for o in outcomes]
    chunkings = {st.chunks_per_stage for st in steps}
    if len(chunkings) > 1:
        steps = _one_chunking(fn, batches, cm, req.options, chunkings)
    secs = time.perf_counter() - t0
    s = cm.setup
    meta = {
        "tool_version": _tool_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": s.model.name, "cluster": s.cluster.name, "gpus": s.cluster.world_size,
        "profile": profile_meta(cm.profile),
        "strategy": strategy,
        "options": {**json.loads(json.dumps(dataclasses.asdict(req.options))), "lengths": req.lengths,
                    "tokens_per_step": step_tokens(req, cm),
                    "max_context_tokens": req.max_context_tokens, "steps": req.steps},
        "solver": solver_meta([o.solver for o in outcomes if o.solver is not None], strategy, secs),
        "seed": req.seed,
        "training": s.training.to_dict(),
        "model_spec": dataclasses.asdict(s.model),
        "cluster_spec": {k: v for k, v in s.cluster.to_dict().items() if k != "world_size"},  # from_dict's keys
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
    every step fits HBM (the least peak memory when none does). A v under which some step cannot be planned
    (pipelines sharing a unit deadlock at that interleaving) is skipped; none left: the last error."""
    best, error = None, None
    for v in sorted(chunkings):
        try:
            steps = [fn(b, cm, dataclasses.replace(options, hdp=dataclasses.replace(options.hdp, pp_v=v)))
                     for b in batches]
        except PlanError as e:
            error = e
            continue
        key = fits_first(sum(st.predicted.step_time_s for st in steps),
                         max(max(st.predicted.peak_memory_bytes) for st in steps), cm.budget.hbm_bytes)
        if best is None or key < best[0]:
            best = (key, steps)
    if best is None:
        raise error
    return best[1]


def cost_model_for_plan(plan: Plan, profile: str | None = None) -> CostModel:
    """The cost model a plan was made with (specs from its meta), optionally on another profile."""
    from costmodel.specs import ClusterSpec, ModelSpec

    m = plan.meta
    try:
        model = ModelSpec.from_dict(m["model_spec"])
        cluster = ClusterSpec.from_dict(m["cluster_spec"])
        training = TrainingSpec.from_dict(m["training"], origin="plan meta.training")
    except KeyError as e:
        raise PlanError(f"plan meta lacks {e}; re-create the plan with `meshplan plan`") from None
    if training.expert_groups > 1:  # HDP ranks run different units: no lockstep for an expert group across them
        raise PlanError(f"plan meta: ep={training.ep} x etp={training.etp} spans {training.expert_groups} HDP ranks; "
                        "a plan's experts must stay in the TP group (drop etp, ep dividing tp)")
    setup = Setup(model, cluster, training)
    if profile:  # another profile than the plan's: say so if it is another device's
        prof = load_profile(profile)
        warn_device_mismatch(prof, cluster)
    else:
        prof = _recorded_profile(m.get("profile"), cluster.profile)
        warn_cpu_host_mismatch(prof, cluster)
    cm = CostModel(setup, prof)
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
    fits_hbm: bool  # every step's simulated peak (fragmentation reserve included) within the GPU's HBM

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarize(plan: Plan, cm: CostModel, static_step_time_s: float | None = None) -> Summary:
    st = plan.steps
    step_time = float(np.mean([s.predicted.step_time_s for s in st]))
    lb = float(np.mean([s.predicted.lower_bound_s for s in st]))
    tokens = float(np.mean([s.global_tokens for s in st]))
    world = cm.setup.cluster.world_size
    peak = cm.peak_flops()
    f_half, f_full = (float(np.mean([training_flops([q.length for q in s.sequences], cm.setup, halved) for s in st]))
                      for halved in (True, False))
    busy = np.array([s.predicted.per_rank_busy_s for s in st]).mean(axis=0)
    peak_bytes = float(max(max(s.predicted.peak_memory_bytes) for s in st))
    return Summary(
        strategy=plan.meta["strategy"], step_time_s=step_time, lower_bound_s=lb, tokens_per_s=tokens / step_time,
        mfu=f_half / (step_time * world * peak), mfu_unhalved=f_full / (step_time * world * peak),
        speedup_vs_static=(static_step_time_s / step_time) if static_step_time_s else None,
        busiest_rank_s=float(busy.max()), idlest_rank_s=float(busy.min()),
        peak_memory_bytes=peak_bytes, planning_s=float(plan.meta["solver"]["seconds"]),
        fits_hbm=peak_bytes <= cm.budget.hbm_bytes)


@dataclass(frozen=True)
class Choice:
    """The strategy whose plan is written, and one line saying why."""

    strategy: str
    reason: str


def _secs(t_s: float) -> str:
    return f"{t_s:,.0f} s" if t_s >= 100 else f"{t_s:.3g} s"


@dataclass
class Comparison:
    plans: dict[str, Plan]
    summaries: list[Summary]  # in the order compared; only strategies that planned
    failures: dict[str, str]  # strategy -> reason it could not plan
    cost_model: CostModel
    batches: list[GlobalBatch]

    def chosen(self, strategy: str | None = None) -> Choice:
        """The plan to write: `strategy` when one is forced, else the fastest that planned and fits HBM
        (least mean predicted step time; a tie goes to the first compared). Raises PlanError when the
        forced strategy, or every strategy, could not plan or does not fit: a written plan always fits."""
        if strategy is not None and strategy not in self.plans:
            raise PlanError(f"strategy {strategy} could not plan this case: "
                            f"{self.failures.get(strategy, 'it was not compared')}")
        if not self.summaries:
            raise PlanError("no strategy could plan this case: "
                            + "; ".join(f"{n}: {why}" for n, why in self.failures.items()))
        over = [x for x in self.summaries if not x.fits_hbm and (strategy is None or x.strategy == strategy)]
        if strategy is not None and over or len(over) == len(self.summaries):
            peaks = ", ".join(f"{x.strategy} {x.peak_memory_bytes / 1e9:.2f} GB" for x in over)
            hbm = self.cost_model.budget.hbm_bytes
            raise PlanError(f"no plan written: {peaks} over the {hbm / 1e9:.4g} GB HBM (simulated peak, fragmentation "
                            "reserve included); try --recompute full, more GPUs, a larger tp or pp, a smaller "
                            "--capacity, or " + ("another --strategy" if strategy else "a shorter --max-context"))
        fitting = [x for x in self.summaries if x.fits_hbm]
        ranked = sorted(fitting, key=lambda x: x.step_time_s)  # stable: ties keep the compared order
        best = ranked[0]
        if strategy is not None:
            mine = next(x for x in self.summaries if x.strategy == strategy)
            faster = "" if mine.step_time_s <= best.step_time_s else f"; {best.strategy} {_secs(best.step_time_s)}"
            return Choice(strategy, f"as requested ({_secs(mine.step_time_s)}{faster})")
        note = f"; over HBM: {', '.join(x.strategy for x in over)}" if over else ""
        if len(ranked) == 1:
            what = "planned" if len(self.summaries) == 1 else "fits HBM"
            return Choice(best.strategy, f"the only strategy that {what} ({_secs(best.step_time_s)}){note}")
        second = ranked[1]
        t_best, t_second = _secs(best.step_time_s), _secs(second.step_time_s)
        vs = f", tied with {second.strategy}" if t_best == t_second else f" vs {second.strategy} {t_second}"
        among = ", ".join(x.strategy for x in fitting)
        return Choice(best.strategy, f"fastest of {among} ({t_best}{vs}){note}")


def compare(req: PlanRequest, strategies: list[str], progress=None) -> Comparison:
    """Plan the same batches with several strategies on one cost model; speedups are vs static."""
    cm = build_cost_model(req)
    batches = make_batches(req, cm)
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

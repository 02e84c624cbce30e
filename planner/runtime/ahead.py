"""Plan-ahead's planner (`meshplan replay --plan-ahead`): plan step t of a run from the length source
with the request the replayed plan was made with (its meta: strategy, options, specs, profile), as
`meshplan plan` would have planned it.

This is the one place the runtime plans: it calls the planner's public API (`planner.api`), imported
only when plan-ahead is asked for, and never a strategy directly. Torch-free, so that `meshplan
replay` refuses a request that cannot plan before any process starts. Since a length source's first
t batches are a prefix of its first t + 1 (planner.workload.global_batches), step t planned ahead is
the step t of `meshplan plan --steps N` with the same request. With pp > 1 every step is planned at the
replayed plan's first step's chunk count v (a run places its layers once), as `--pp-v v` would pin it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from planner.plan import Plan, PlanError, Step
from profiles.typed_json import Reader

StepPlanner = Callable[[int], Step]  # replay iteration t -> the validated plan step it runs


def step_planner(plan: Plan, lengths: str | None, iterations: int, where: str) -> StepPlanner:
    """A function planning iteration t (0 ≤ t < iterations) of `plan`'s request on `lengths` (None: the
    plan's own length source). The cost model and the batches are built here, once; planning is per call.
    Raises PlanError (one line) when the plan records no request or the request cannot plan."""
    from planner.api import PlanRequest, cost_model_for_plan, make_batches, make_plan  # the planner: rank 0 only
    from planner.strategies import STRATEGIES, PlanOptions

    meta = plan.meta
    v = plan.steps[0].chunks_per_stage  # the run's layer placement (launch.Prepared.chunks)
    strategy, options = meta.get("strategy"), meta.get("options")
    need = ("lengths", "tokens_per_step", "max_context_tokens")
    if strategy not in STRATEGIES or not isinstance(options, dict) or any(k not in options for k in need):
        raise PlanError(f"--plan-ahead: {where} records no planning request (meta.strategy, meta.options with "
                        f"{', '.join(need)}); plan-ahead re-plans with the request of a plan written by "
                        "`meshplan plan`")
    try:
        cm = cost_model_for_plan(plan)
        opt = Reader(f"{where} meta.options", PlanError).build(PlanOptions, options, ignore_unknown=True)
        if plan.mesh.pp > 1:  # the run places its layers once: every step at the first step's v (check_step)
            opt = replace(opt, hdp=replace(opt.hdp, pp_v=v))
        req = PlanRequest(lengths=lengths or options["lengths"], steps=iterations,
                          tokens_per_step=options["tokens_per_step"], max_context_tokens=options["max_context_tokens"],
                          seed=int(meta.get("seed") or 0), options=opt)
        batches = make_batches(req, cm)
    except ValueError as e:  # PlanError, SpecError, ProfileError, SourceError: each one line
        raise PlanError(f"--plan-ahead: {e}") from None
    if (cm.setup.hdp, cm.setup.training.pp, cm.setup.training.tp) != (plan.mesh.hdp, plan.mesh.pp, plan.mesh.tp):
        raise PlanError(f"--plan-ahead: {where}: the mesh does not match its meta's training setup (edited plan?)")

    def plan_step(t: int) -> Step:
        try:
            return make_plan(req, strategy, cm, [batches[t]]).steps[0]  # validated by make_plan
        except PlanError as e:
            if plan.mesh.pp == 1:
                raise
            raise PlanError(f"--plan-ahead iteration {t}: no plan at the run's {v} model chunks per stage (the "
                            f"first step's v; the layers are placed once): {e}") from None

    return plan_step


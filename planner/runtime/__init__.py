"""The torch executor: replays a plan under torchrun (`python -m planner.runtime plan.json`).

The only package besides profiles/measure that imports torch; it reads plans (planner/plan)
and never imports strategies. Entry points: `executor.run(ReplayOptions)` on each rank, and
`meshplan replay` (cli.py), which launches torchrun after `preflight`. This file stays free of
torch so the CLI can refuse a plan before any process starts."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from costmodel.presets import load_model
from costmodel.specs import ModelSpec
from planner.plan import Plan, PlanError, validate


CP_IMPLS = ("ring", "allgather")  # context-parallel attention: overlapped ring, or all-gather first-correct form
BLOCK_KERNELS = ("auto", "math", "fused-cpu")  # ring block kernel (auto: fused on CPU, math elsewhere)
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class InjectedFailure:
    """Testing (`--inject-failure RANK:UNIT[:kill]`): global rank `rank` fails in the forward of unit
    `unit`, raising an error, or with `kill` by SIGKILL on itself (a crash that leaves no message)."""

    rank: int
    unit: int
    kill: bool = False

    @classmethod
    def parse(cls, text: str) -> InjectedFailure:
        parts = text.split(":")
        try:
            if len(parts) not in (2, 3) or parts[2:] not in ([], ["kill"]):
                raise ValueError
            return cls(int(parts[0]), int(parts[1]), kill=len(parts) == 3)
        except ValueError:
            raise ValueError(f"expected RANK:UNIT or RANK:UNIT:kill, got {text!r}") from None

    def fire(self, rank: int, unit: int) -> None:
        if (rank, unit) != (self.rank, self.unit):
            return
        if self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("injected failure (--inject-failure)")


def _choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PlanError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")


def preflight(plan_path: str | Path, world_size: int | None, model: str | None = None, *, cp_impl: str = "ring",
              ring_kernel: str = "auto", optimizer: str = "adamw", steps: int | None = None) -> tuple[Plan, ModelSpec]:
    """Load and validate the plan against the job's world size (None: not known yet) and the
    model the replay will build, and check the options; raise PlanError or SpecError with a
    message a user can act on."""
    _choice("context-parallel implementation", cp_impl, CP_IMPLS)
    _choice("ring kernel", ring_kernel, BLOCK_KERNELS)
    _choice("optimizer", optimizer, OPTIMIZERS)
    if steps is not None and steps < 1:
        raise PlanError(f"--steps must be >= 1, got {steps}")
    plan = Plan.load(plan_path)
    validate(plan)
    m = plan.mesh
    if world_size is not None and m.world_size != world_size:
        raise PlanError(f"{plan_path}: the plan is for world_size {m.world_size} (tp {m.tp} × pp {m.pp} × hdp "
                        f"{m.hdp}) but this job has {world_size} processes; launch {m.world_size} "
                        f"(meshplan replay --nproc {m.world_size})")
    if m.pp > 1:
        _check_pipelined(plan, str(plan_path))
    name = model or plan.meta.get("model")
    if not name:
        raise PlanError(f"{plan_path}: the plan names no model (meta.model); pass --model NAME")
    spec = load_model(str(name))
    if spec.is_moe:
        raise PlanError(f"model {spec.name!r}: MoE replay is not implemented (dense Llama-style models only); "
                        "pass --model tiny or a dense preset")
    if spec.head_dim % 2:
        raise PlanError(f"model {spec.name!r}: RoPE needs an even head_dim, got {spec.head_dim}")
    for what, n in (("heads", spec.heads), ("kv_heads", spec.kv_heads), ("ffn", spec.ffn)):
        if n % m.tp:
            raise PlanError(f"model {spec.name!r}: {what} = {n} does not split over tp = {m.tp} (whole heads and "
                            "equal FFN slices per TP rank); pass a model whose heads, kv_heads and ffn divide by tp")
    chunks = m.pp * int((plan.steps[0].pipeline or {}).get("v", 1))
    if spec.layers < chunks:
        raise PlanError(f"model {spec.name!r} has {spec.layers} layers, fewer than the plan's {chunks} pipeline "
                        "chunks (pp × v); pass a deeper --model")
    return plan, spec


def _check_pipelined(plan: Plan, where: str) -> None:
    """What the pipeline replay needs beyond validate(): one layer placement for the whole run, and
    no empty slice (a slice is the j-th part of every document of its unit)."""
    vs = {int((s.pipeline or {}).get("v", 1)) for s in plan.steps}
    if len(vs) > 1:
        raise PlanError(f"{where}: steps use different chunk counts v {sorted(vs)}; a run places its layers once, "
                        "so every step must use the same v")
    for st in plan.steps:
        for u in st.units:
            per_doc: dict[int, int] = {}
            for p in u.pieces:
                per_doc[p.seq] = per_doc.get(p.seq, 0) + p.tokens
            longest = max(per_doc.values())
            if u.slices > longest:
                raise PlanError(f"{where}: step {st.step} unit {u.id} has {u.slices} slices but its longest "
                                f"document only {longest} tokens; a slice must hold at least one token")

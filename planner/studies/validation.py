"""Validation against published measurements: each case of a packaged calibration set (today Korthikanti
et al. 2022 on A100) priced by the current cost model, with error = predicted / published − 1 computed
here at run time and the MAPE over the cases (as Calculon's validation does). Nothing is fitted: the
profile and the model presets are used as they are, so the table shows the model's real error.

Modelling of the published runs, the same for every case:
  * Megatron sequence parallelism: the TP all-reduce becomes a reduce-scatter plus an all-gather of the
    same bytes, activations are split over t; TP without SP moves the same bytes (ring all-reduce =
    reduce-scatter + all-gather), so its time is priced the same;
  * one micro-batch of b sequences of s tokens is one unit of b documents; a pipeline runs the row's
    m = global batch / micro-batch micro-batches through its 1F1B or interleaved schedule on the
    event engine (planner.schedule), the LM head on the last stage, activations sent between stages;
  * DP = 1: no gradient synchronisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

from costmodel.presets import load_cluster, load_model
from costmodel.specs import Recompute, Setup, SpecError, TrainingSpec
from costmodel.timing import CostModel, UnitCost
from planner.schedule import PipeOp, dependency, run_ops, stage_ops
from profiles.table import Profile, load_profile
from profiles.typed_json import Reader, positive

CALIBRATION_SETS = ("korthikanti2022",)  # packaged in planner/studies/data/<name>.json (+ .md source note)

# What every prediction leaves out or assumes beyond the module docstring's rules; each row repeats it.
_COMMON_NOTE = ("attention priced by the profile's FlashAttention table (the paper ran unfused softmax); "
                "optimizer step and embedding lookup not priced")


@dataclass(frozen=True)
class LayerCase:
    """One transformer layer's forward and backward time, measured on one micro-batch."""

    label: str  # what the paper calls the configuration
    model: str  # model preset
    tp: int = field(metadata=positive())  # tensor-parallel degree
    micro_batch: int = field(metadata=positive())  # sequences per micro-batch b
    recompute: Recompute  # activation recomputation policy
    sequence_parallel: bool  # Megatron SP on top of TP
    forward_ms: float = field(metadata=positive())  # published forward time of one layer
    backward_ms: float = field(metadata=positive())  # published backward time (recompute included)
    note: str = ""  # what the paper leaves open and what is assumed


@dataclass(frozen=True)
class IterationCase:
    """One training iteration end to end: m micro-batches through the pipeline, DP = 1."""

    label: str
    model: str  # model preset
    gpus: int = field(metadata=positive())
    tp: int = field(metadata=positive())
    pp: int = field(metadata=positive())
    global_batch: int = field(metadata=positive())  # sequences per iteration
    micro_batch: int = field(metadata=positive())  # sequences per micro-batch
    chunks: int = field(metadata=positive())  # model chunks per stage v (1: 1F1B, > 1: interleaved)
    recompute: Recompute
    sequence_parallel: bool
    iteration_s: float = field(metadata=positive())  # published iteration time
    note: str = ""


@dataclass(frozen=True)
class CalibrationSet:
    """Published measurements of one source, all on one cluster and sequence length."""

    source: str  # the paper and its tables
    hardware: str  # what the measurements ran on
    cluster: str  # the cluster preset that describes that hardware
    seq_tokens: int = field(metadata=positive())  # sequence length s of every case
    layer_cases: list[LayerCase] = field(default_factory=list)
    iteration_cases: list[IterationCase] = field(default_factory=list)


@dataclass(frozen=True)
class ValidationRow:
    """A published figure next to the cost model's prediction of it."""

    case: str  # label and quantity, e.g. "22B layer, SP + selective: backward"
    unit: str  # "ms" or "s"
    published: float
    predicted: float
    note: str  # the modelling assumptions behind `predicted`

    @property
    def error(self) -> float:
        """predicted / published − 1: positive when the model is pessimistic (slower than measured)."""
        return self.predicted / self.published - 1.0


@dataclass(frozen=True)
class ValidationReport:
    """Every row of a calibration set on one profile."""

    name: str  # the calibration set (CALIBRATION_SETS)
    source: str  # its paper and tables
    profile: str  # the profile's name
    rows: tuple[ValidationRow, ...]

    @property
    def mape(self) -> float:
        """Mean absolute percentage error over the rows, as a fraction."""
        return float(np.mean([abs(r.error) for r in self.rows]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "profile": self.profile, "mape": self.mape,
                "rows": [{"case": r.case, "unit": r.unit, "published": r.published, "predicted": r.predicted,
                          "error": r.error, "note": r.note} for r in self.rows]}


@cache
def load_calibration_set(name: str = "korthikanti2022") -> CalibrationSet:
    """A packaged calibration set by name (CALIBRATION_SETS)."""
    if name not in CALIBRATION_SETS:
        raise SpecError(f"unknown calibration set {name!r}; packaged: {', '.join(CALIBRATION_SETS)}")
    text = resources.files("planner.studies").joinpath("data", f"{name}.json").read_text()
    return Reader(f"calibration set {name}", SpecError).build(CalibrationSet, json.loads(text))


def _cost_model(cal: CalibrationSet, model: str, gpus: int, training: TrainingSpec, profile: Profile) -> CostModel:
    cluster = load_cluster(cal.cluster).with_gpus(gpus)
    return CostModel(Setup(load_model(model), cluster, training), profile)


def _sp_note(sequence_parallel: bool) -> str:
    return ("TP + SP: reduce-scatter + all-gather per TP all-reduce" if sequence_parallel
            else "TP without SP: all-reduce priced as reduce-scatter + all-gather of the same bytes")


def layer_rows(cal: CalibrationSet, case: LayerCase, profile: Profile) -> list[ValidationRow]:
    """Forward and backward of one layer: a pp = 1 stage's unit cost (head excluded) over its layers."""
    cm = _cost_model(cal, case.model, case.tp, TrainingSpec(tp=case.tp, recompute=case.recompute), profile)
    unit = cm.unit_cost([cal.seq_tokens] * case.micro_batch, with_head=False)
    note = "; ".join(x for x in (_sp_note(case.sequence_parallel), _COMMON_NOTE, case.note) if x)
    per_layer_ms = 1e3 / cm.layers_per_stage
    return [ValidationRow(f"{case.label}: forward", "ms", case.forward_ms, unit.fwd_s * per_layer_ms, note),
            ValidationRow(f"{case.label}: backward", "ms", case.backward_ms, unit.bwd_s * per_layer_ms, note)]


def pipeline_time_s(p: int, m: int, v: int, unit: UnitCost, p2p_s: float) -> float:
    """One iteration of m identical micro-batches on p stages of v chunks each (v = 1: 1F1B, else
    interleaved), run on the event engine: each op takes the stage's time ÷ v, the LM head is added to
    the last chunk of the last stage, and every hand-over between stages waits `p2p_s`."""
    body_f, body_b = (unit.fwd_s - unit.head_fwd_s) / v, (unit.bwd_s - unit.head_bwd_s) / v
    lists = {s: [((s, op), op) for op in stage_ops(p, s, [1] * m, v)] for s in range(p)}

    def duration(key: tuple[int, PipeOp]) -> float:
        stage, op = key
        head = stage == p - 1 and op.chunk == v - 1
        if op.kind == "F":
            return body_f + (unit.head_fwd_s if head else 0.0)
        return body_b + (unit.head_bwd_s if head else 0.0)

    def dep(key: tuple[int, PipeOp]) -> tuple[int, PipeOp] | None:
        return dependency(key[1], key[0], p, v, 0)

    def transfer(key: tuple[int, PipeOp]) -> float:
        d = dep(key)
        return p2p_s if d is not None and d[0] != key[0] else 0.0

    return max(r.end_s for r in run_ops(lists, dep, duration, transfer))


def iteration_row(cal: CalibrationSet, case: IterationCase, profile: Profile) -> ValidationRow:
    """The iteration time of a row: its micro-batches through its pipeline schedule."""
    training = TrainingSpec(tp=case.tp, pp=case.pp, recompute=case.recompute)
    cm = _cost_model(cal, case.model, case.gpus, training, profile)
    if cm.setup.hdp != 1:
        raise SpecError(f"calibration case {case.label!r}: {case.gpus} GPUs at tp={case.tp}, pp={case.pp} is not "
                        "DP = 1; give gpus = tp * pp")
    if case.global_batch % case.micro_batch:
        raise SpecError(f"calibration case {case.label!r}: global batch {case.global_batch} is not a multiple of "
                        f"the micro-batch {case.micro_batch}")
    m = case.global_batch // case.micro_batch
    unit = cm.unit_cost([cal.seq_tokens] * case.micro_batch, with_head=True)
    p2p = cm.pp_p2p_s(case.micro_batch * cal.seq_tokens) if case.pp > 1 else 0.0
    schedule = f"interleaved, {case.chunks} chunks" if case.chunks > 1 else "1F1B"
    note = "; ".join(x for x in (f"{m} micro-batches, {schedule} on the event engine", _sp_note(case.sequence_parallel),
                                 "DP = 1: no gradient sync; tied-embedding all-reduce not priced", _COMMON_NOTE,
                                 case.note) if x)
    return ValidationRow(case.label, "s", case.iteration_s, pipeline_time_s(case.pp, m, case.chunks, unit, p2p), note)


def validate_cost_model(profile: str | Profile | None = None, name: str = "korthikanti2022") -> ValidationReport:
    """Every case of the calibration set `name` on `profile` (a Profile, a name or path; default: the
    set's cluster's profile)."""
    cal = load_calibration_set(name)
    if not isinstance(profile, Profile):
        profile = load_profile(profile or load_cluster(cal.cluster).profile)
    rows = [r for case in cal.layer_cases for r in layer_rows(cal, case, profile)]
    rows += [iteration_row(cal, case, profile) for case in cal.iteration_cases]
    return ValidationReport(name, cal.source, profile.fingerprint.name, tuple(rows))

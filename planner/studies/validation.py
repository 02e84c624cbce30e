"""Validation against published measurements: each case of a packaged calibration set (CALIBRATION_SETS), or
of a user's own set file of the same schema, priced by the current cost model, with error = predicted /
published − 1 computed here at run time and the MAPE over the cases (as Calculon's validation does). Nothing is fitted: the
profile and the model presets are used as they are, so the table shows the model's real error.

Modelling of the published runs, the same for every case:
  * the case's training spec says what ran: sequence parallelism or not (without it the norms, dropout and
    residuals run replicated on every TP rank; the TP collectives move the same bytes either way), the
    attention kernel of the set (materialised softmax before FlashAttention), the recompute policy;
  * one micro-batch of b sequences of s tokens is one unit of b documents, sharded over the CP ranks when
    cp > 1; a pipeline runs the row's m = global batch / (micro-batch · DP) micro-batches through its 1F1B or
    interleaved schedule on the event engine (planner.schedule), each chunk with its own layers (chunk_layers),
    the LM head on the last stage, activations sent between stages; then the gradient synchronisation over DP × CP
    ranks (what each model chunk's last backward does not hide, where the run overlaps it) and the optimizer step;
    under FSDP (zero_stage 3, pp = 1) each micro-batch is a round of per-layer all-gathers and reduce-scatters
    (costmodel.zero.round_time_s) and no gradient sync follows;
  * a figure published as TFLOP/s per GPU is turned into an iteration time with the paper's own FLOP count
    (`flops_convention`), one published as tokens/s per GPU with the batch's tokens, so the error is the same
    quantity for every row.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np

from costmodel.memory import allgather_cp_working_bytes, logits_bytes, model_state_bytes
from costmodel.presets import cluster_names, load_cluster, load_model, model_names
from costmodel.specs import ModelSpec, Recompute, Setup, SpecError, TrainingSpec
from costmodel.timing import CostModel, UnitCost
from costmodel.zero import round_collectives, round_time_s
from planner.schedule import PipeOp, chunk_gradient_shares, chunk_last_backwards, dependency, run_ops, stage_ops
from planner.simulate.memory import recompute_working_bytes
from profiles.table import Profile, load_profile, read_json
from profiles.typed_json import Reader, positive

# Packaged in planner/studies/data/<name>.json (+ .md source note). The design sets informed the cost model:
# Korthikanti et al.'s errors were looked at while its terms were added; the Megatron-Bridge Blackwell rows decided
# that Blackwell's GEMM rates take Hopper's measured sustained ratios (profiles.analytic._blackwell_gemm). The others
# are held out: nothing is ever tuned to them.
CALIBRATION_SETS = ("korthikanti2022", "narayanan2021", "llama3_2024", "megatron_bridge2025", "nemo2024",
                    "nemo_longseq2024", "torchtitan_a100_2024", "megatron_bridge_b200_2025",
                    "megatron_bridge_gb200_2025", "bloom2022", "flashattention2_2023", "megatron_bridge_moe2025",
                    "megatron_bridge_cuda_graphs2026", "llmfoundry_mpt2023")
DESIGN_SETS = frozenset({"korthikanti2022", "megatron_bridge_b200_2025", "megatron_bridge_gb200_2025"})
FlopsConvention = Literal["megatron2021", "palm"]


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
    iteration_s: float | None = field(default=None, metadata=positive())  # published iteration time
    tflops_per_gpu: float | None = field(default=None, metadata=positive())  # or the achieved rate it gives
    tokens_per_s_per_gpu: float | None = field(default=None, metadata=positive())  # or the throughput it gives
    cp: int = field(default=1, metadata=positive())  # context-parallel degree (ring attention)
    seq_tokens: int | None = field(default=None, metadata=positive())  # when it differs from the set's
    training: dict[str, Any] = field(default_factory=dict)  # TrainingSpec fields of this run over the set's
    # Megatron-core's pipeline_model_parallel_layout, e.g. "Et|(tt|)*30mL" (parse_pipeline_layout); None:
    # chunk_layers' even split
    layout: str | None = None
    note: str = ""


@dataclass(frozen=True)
class CalibrationSet:
    """Published measurements of one source, all on one cluster."""

    source: str  # the paper and its tables
    hardware: str  # what the measurements ran on
    cluster: str  # the cluster preset that describes that hardware
    seq_tokens: int = field(metadata=positive())  # sequence length s of the cases
    # TrainingSpec fields every run of the set shared (e.g. attention_kernel "unfused" before FlashAttention,
    # zero_stage 0 before Megatron's distributed optimizer, loss fp32, dtype); per case: tp, pp, recompute, SP
    training: dict[str, Any] = field(default_factory=dict)
    flops_convention: FlopsConvention | None = None  # how the paper turns time into TFLOP/s, if it gives rates
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # ModelSpec JSON of models not in presets
    layer_cases: list[LayerCase] = field(default_factory=list)
    iteration_cases: list[IterationCase] = field(default_factory=list)

    def model(self, name: str) -> ModelSpec:
        """A model of this set, else a preset."""
        if name in self.models:
            return ModelSpec.from_dict(self.models[name], origin=f"calibration set model {name}")
        return load_model(name)


# What ValidationRow.parts holds, as the breakdown table heads them
BREAKDOWN_PARTS = {"gemm": "GEMM", "attention": "attention", "elementwise": "elementwise", "fixed": "fixed",
                   "head": "head", "tp_comm": "TP comm", "cp_exposed": "CP exposed", "offload_exposed": "offload",
                   "schedule": "bubble/FSDP", "grad_sync": "grad sync", "optimizer": "optimizer"}


# The kinds of run whose errors are summed apart (REFERENCE 13: a model right on one shape can be wrong on another):
# the GPU, the sequence length, the layout, dense or MoE.
FACETS = {"gpu": "GPU", "sequence": "sequence", "layout": "layout", "model": "model"}
SEQUENCE_BUCKETS = (("≤1K", 1024), ("1-2K", 2048), ("2-4K", 4096), ("4-8K", 8192), ("8-64K", 65536), (">64K", None))


def row_facets(gpu: str, seq_tokens: int, pp: int = 1, chunks: int = 1, cp: int = 1, zero_stage: int = 1,
               layer: bool = False, moe: bool = False) -> dict[str, str]:
    """A row's facet values: its cluster's GPU; its sequence length's bucket (SEQUENCE_BUCKETS: tokens up to each
    bound); its layout (one layer alone, FSDP, an interleaved or 1F1B pipeline, or neither; "+ CP" with context
    parallelism); its model, dense or MoE."""
    seq = next(name for name, bound in SEQUENCE_BUCKETS if bound is None or seq_tokens <= bound)
    if layer:
        layout = "one layer"
    elif zero_stage == 3:
        layout = "FSDP"
    else:
        layout = "interleaved PP" if pp > 1 and chunks > 1 else ("1F1B PP" if pp > 1 else "no PP")
    return {"gpu": gpu, "sequence": seq, "layout": layout + (" + CP" if cp > 1 else ""),
            "model": "MoE" if moe else "dense"}


def facet_errors(rows: list["ValidationRow"], facet: str) -> list[tuple[str, int, float, float]]:
    """(value, rows, MAPE, mean signed error) of `rows` per value of `facet`: sequence lengths shortest first, the
    other facets' values the most rows first."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(r.facets.get(facet, "?"), []).append(r.error)
    out = [(v, len(e), float(np.mean(np.abs(e))), float(np.mean(e))) for v, e in groups.items()]
    if facet == "sequence":
        order = [name for name, _ in SEQUENCE_BUCKETS]
        return sorted(out, key=lambda x: order.index(x[0]) if x[0] in order else len(order))
    return sorted(out, key=lambda x: (-x[1], x[0]))


@dataclass(frozen=True)
class ValidationRow:
    """A published figure next to the cost model's prediction of it."""

    case: str  # label and quantity, e.g. "22B layer, SP + selective: backward"
    unit: str  # "ms" or "s"
    published: float
    predicted: float
    note: str  # the modelling assumptions behind `predicted`
    # `predicted` by kind, in its unit, summing to it (UnitCost.parts_s; iterations add their schedule's idle and
    # exposed time, the gradient sync and the optimizer: BREAKDOWN_PARTS)
    parts: dict[str, float] = field(default_factory=dict)
    facets: dict[str, str] = field(default_factory=dict)  # what kind of run it is, by FACETS (row_facets)

    @property
    def error(self) -> float:
        """predicted / published − 1: positive when the model is pessimistic (slower than measured)."""
        return self.predicted / self.published - 1.0


@dataclass(frozen=True)
class ValidationReport:
    """Every row of a calibration set on one profile."""

    name: str  # the calibration set (CALIBRATION_SETS), or the path of a user's set file
    source: str  # its paper and tables
    profile: str  # the profile's name
    rows: tuple[ValidationRow, ...]
    memory: tuple[MemoryRow, ...] = ()  # the iteration cases' peak memory per GPU
    attention_kernel: str | None = None  # every run priced with this attention kernel (None: each its own)

    @property
    def held_out(self) -> bool:
        """True for every set but the design sets (DESIGN_SETS): their errors never informed the model."""
        return self.name not in DESIGN_SETS

    @property
    def mape(self) -> float:
        """Mean absolute percentage error over the rows, as a fraction."""
        return float(np.mean([abs(r.error) for r in self.rows]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "profile": self.profile, "held_out": self.held_out,
                "attention_kernel": self.attention_kernel, "mape": self.mape,
                "rows": [{"case": r.case, "unit": r.unit, "published": r.published, "predicted": r.predicted,
                          "error": r.error, "note": r.note, "parts": r.parts, "facets": r.facets} for r in self.rows],
                "memory": [{"case": r.case, "peak_bytes": r.peak_bytes, "allocated_bytes": r.allocated_bytes,
                            "hbm_bytes": r.hbm_bytes, "headroom_bytes": r.headroom_bytes, "fits": r.fits,
                            "fits_with_reserve": r.fits_with_reserve,
                            "stage": r.stage, "held_layers": r.held_layers, "parts": r.parts} for r in self.memory]}


def load_calibration_set(name: str = "korthikanti2022") -> CalibrationSet:
    """A packaged calibration set by name (CALIBRATION_SETS), or a set JSON file of the same schema by path: a
    user's own measured runs (held out: nothing of the model was fitted to them), read afresh on every call. A path
    set's cluster and models may be presets or files, relative paths read from the set file's folder."""
    if name in CALIBRATION_SETS:
        return _packaged_set(name)
    path = Path(name).resolve()
    if path.suffix != ".json" and not path.exists():
        raise SpecError(f"unknown calibration set {name!r}; packaged: {', '.join(CALIBRATION_SETS)} (or a path to "
                        "a set JSON file of the same schema: docs/COSTMODEL.md \"Your own measurements\")")
    data = read_json(path, "calibration set", SpecError)
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a calibration set JSON object, not {type(data).__name__}")
    cal = Reader(f"calibration set {path}", SpecError).build(CalibrationSet, data)
    if not cal.layer_cases and not cal.iteration_cases:
        raise SpecError(f"{path}: the calibration set has no layer_cases or iteration_cases to price")
    return _beside(cal, path.parent)


@cache
def _packaged_set(name: str) -> CalibrationSet:
    text = resources.files("planner.studies").joinpath("data", f"{name}.json").read_text()
    return Reader(f"calibration set {name}", SpecError).build(CalibrationSet, json.loads(text))


def _beside(cal: CalibrationSet, folder: Path) -> CalibrationSet:
    """`cal` with its cluster and case models that are not presets read as files relative to `folder` (the set
    file's); absolute paths stay as they are."""
    def local(ref: str, presets: list[str]) -> str:
        return ref if ref in presets else str(folder / ref)

    def case(c: LayerCase | IterationCase) -> LayerCase | IterationCase:
        return c if c.model in cal.models else dataclasses.replace(c, model=local(c.model, model_names()))

    return dataclasses.replace(cal, cluster=local(cal.cluster, cluster_names()),
                               layer_cases=[case(c) for c in cal.layer_cases],
                               iteration_cases=[case(c) for c in cal.iteration_cases])


def _cost_model(cal: CalibrationSet, model: ModelSpec, gpus: int, training: TrainingSpec,
                profile: Profile) -> CostModel:
    cluster = load_cluster(cal.cluster).with_gpus(gpus)
    return CostModel(Setup(model, cluster, training), profile)


def _training(cal: CalibrationSet, case: LayerCase | IterationCase, pp: int = 1) -> TrainingSpec:
    """What the case ran: TP (with or without SP), PP, its recompute, the set's shared training fields and an
    iteration case's own (a recipe that differs from the set's, e.g. one run without TP overlap)."""
    own = case.training if isinstance(case, IterationCase) else {}
    if clash := sorted(set(own) & {"tp", "pp", "recompute", "sequence_parallel"}):
        raise SpecError(f"calibration case {case.label!r}: give {', '.join(clash)} as the case's own field, not "
                        "in its training")
    fields = {**cal.training, **own, "tp": case.tp, "pp": pp, "recompute": case.recompute,
              "sequence_parallel": case.sequence_parallel}
    return TrainingSpec.from_dict(fields, origin=f"calibration case {case.label}")


_LOSS_NOTES = {"online": "fused online-softmax", "in_place": "in-place fused", "fp32": "fp32"}


def _note(tr: TrainingSpec) -> str:
    """What the prediction assumed of the run, from the training spec it was priced with."""
    tp = ("TP + SP" if tr.sequence_parallel else "TP without SP: norms, dropout, residuals replicated") \
        if tr.tp > 1 else "no TP"
    attn = {"unfused": "materialised attention (QKᵀ, softmax, PV)", "flash": "the profile's FlashAttention",
            "fa1": "FlashAttention(-1)'s rate", "fa1-triton": "FlashAttention in Triton's rate",
            "fa2": "FlashAttention-2's rate", "fa3": "FlashAttention-3's rate",
            "cudnn-2024": "cuDNN attention's rate of July 2024"}[tr.attention_kernel]
    attn += f", {_LOSS_NOTES[tr.loss]} cross-entropy, {tr.dtype}"
    attn += f" ({tr.fp8_recipe} scaling)" if tr.fp8_recipe else ""
    attn += ", fp8 weights gathered" if tr.fp8_param_gather else ""
    attn += (", replicated optimizer", ", distributed optimizer", ", distributed optimizer and gradients (ZeRO-2)",
             ", parameters, gradients and optimizer sharded (FSDP, ZeRO-3)")[tr.zero_stage]
    attn += ", precision-aware optimizer (bf16 moments)" if tr.optimizer_moments == "bf16" else ""
    attn += {"fused": "", "add": f", {tr.grad_dtype} gradients added after each micro-batch's backward",
             "cast_add": f", gradients cast to {tr.grad_dtype} and added after each micro-batch's backward"}[
        tr.grad_accumulation_kind]
    if tr.recompute_modules:
        attn += f", selective recompute of Megatron-core's modules {', '.join(tr.recompute_modules)}"
    overlaps = [name for name, on in (("TP collectives", tr.tp_comm_overlap and tr.tp > 1),
                                      ("gradient reduce", tr.overlap_grad_reduce),
                                      ("parameter gather", tr.overlap_param_gather)) if on]
    return f"{tp}; {attn}" + (f"; overlapped: {', '.join(overlaps)}" if overlaps else "")


def layer_rows(cal: CalibrationSet, case: LayerCase, profile: Profile) -> list[ValidationRow]:
    """Forward and backward of one layer: a pp = 1 stage's unit cost (head excluded) over its layers."""
    cm = _cost_model(cal, cal.model(case.model), case.tp, _training(cal, case), profile)
    unit = cm.unit_cost([cal.seq_tokens] * case.micro_batch, with_head=False)
    note = "; ".join(x for x in (_note(cm.setup.training), case.note) if x)
    per_layer_ms = 1e3 / cm.layers_per_stage
    facets = row_facets(cm.setup.cluster.gpu, cal.seq_tokens, layer=True, moe=cm.model.is_moe)
    return [ValidationRow(f"{case.label}: {name}", "ms", published, (unit.fwd_s if d == "fwd" else unit.bwd_s)
                          * per_layer_ms, note, {k: v * per_layer_ms for k, v in unit.parts_s(d).items()}, facets)
            for name, d, published in (("forward", "fwd", case.forward_ms), ("backward", "bwd", case.backward_ms))]


def iteration_flops(model: ModelSpec, convention: FlopsConvention, sequences: int, seq_tokens: int,
                    recompute: Recompute) -> float:
    """The FLOPs a paper counts for one iteration of `sequences` sequences of `seq_tokens`.
    megatron2021: Narayanan et al. 2021 eq. 3, 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)), which counts a recompute
    forward (GPT blocks, ffn = 4h); without recompute its layer term is 3/4 of that (72), the head term
    (6·B·s·h·V) unchanged. palm: Chowdhery et al. 2022 App. B as Llama 3 cites it, 6·N + 12·L·H·Q·T per token
    with N the parameters that multiply activations (layers and output head, not the input embedding), the
    attention over the full T × T square, no recompute counted."""
    b, s, l, h, v = sequences, seq_tokens, model.layers, model.hidden, model.vocab
    if convention == "megatron2021":
        layer = 96.0 * b * s * l * h * h * (1 + s / (6 * h)) * (1.0 if recompute == "full" else 0.75)
        return layer + 6.0 * b * s * h * v
    if convention == "palm":
        n = l * model.layer_params(active=True) + v * h
        return b * s * (6.0 * n + 6.0 * l * (model.q_width + model.attn_out_width) * s)  # QKᵀ and PV
    raise SpecError(f"unknown flops convention {convention!r}")


def published_iteration_s(cal: CalibrationSet, case: IterationCase) -> float:
    """The case's published iteration time, or the one its published TFLOP/s or tokens/s per GPU implies."""
    given = [x for x in (case.iteration_s, case.tflops_per_gpu, case.tokens_per_s_per_gpu) if x is not None]
    if len(given) != 1:
        raise SpecError(f"calibration case {case.label!r}: give exactly one of iteration_s, tflops_per_gpu and "
                        "tokens_per_s_per_gpu")
    if case.iteration_s is not None:
        return case.iteration_s
    if case.tokens_per_s_per_gpu is not None:  # no FLOP convention needed: tokens are tokens
        tokens = case.global_batch * (case.seq_tokens or cal.seq_tokens)
        return tokens / (case.tokens_per_s_per_gpu * case.gpus)
    if cal.flops_convention is None:
        raise SpecError(f"calibration case {case.label!r} gives TFLOP/s but its set has no flops_convention")
    flops = iteration_flops(cal.model(case.model), cal.flops_convention, case.global_batch,
                            case.seq_tokens or cal.seq_tokens, case.recompute)
    return flops / (case.tflops_per_gpu * 1e12 * case.gpus)


def pipeline_time_s(p: int, m: int, v: int, unit: UnitCost, p2p_s: float,
                    layers: list[list[int]] | None = None) -> float:
    """One iteration of m identical micro-batches on p stages of v chunks each (v = 1: 1F1B, else
    interleaved), run on the event engine: each op takes the stage's time ÷ v, or with `layers` (each stage's chunks'
    layer counts, chunk_layers) a chunk of n layers n / (v · the largest n) of it (`unit` prices a stage of the largest
    count in every chunk); the LM head is added to the last chunk of the last stage, and every hand-over between
    stages waits `p2p_s`."""
    return pipeline_runs(p, m, v, unit, p2p_s, layers)[0]


def pipeline_runs(p: int, m: int, v: int, unit: UnitCost, p2p_s: float, layers: list[list[int]] | None = None,
                  model: ModelSpec | None = None,
                  unpaired_s: float = 0.0) -> tuple[float, list[tuple[float, float]], list[float]]:
    """pipeline_time_s; (start, end) of each model chunk's last backward on the stage that ends the iteration,
    relative to that end (what an overlapped gradient reduction can hide under); and each of those chunks' share
    of its stage's gradients: its parameters over the stage's (`model`'s layers, the embedding on the first chunk,
    the head on the last; without `model`, its layers over the stage's). `unpaired_s`: what a layer's pass loses
    where the EP overlap finds it no partner, the forwards before a stage's first backward and the backwards after
    its last forward (`unit` prices every pass paired)."""
    counts = layers or [[1] * v for _ in range(p)]
    if len(counts) != p or any(len(chunks) != v for chunks in counts):
        raise ValueError(f"layers: {len(counts)} stages of {[len(c) for c in counts]} chunks, not {p} of {v}")
    per = v * max(max(chunks) for chunks in counts)  # the layers `unit` prices
    body_f, body_b = (unit.fwd_s - unit.head_fwd_s) / per, (unit.bwd_s - unit.head_bwd_s) / per
    lists = {s: [((s, op), op) for op in stage_ops(p, s, [1] * m, v)] for s in range(p)}
    unpaired: set[tuple[int, PipeOp]] = set()
    if unpaired_s:
        for ops in lists.values():
            kinds = [op.kind for _, op in ops]
            first_b, last_f = kinds.index("B"), len(kinds) - 1 - kinds[::-1].index("F")
            unpaired |= {key for i, (key, op) in enumerate(ops)
                         if (op.kind == "F" and i < first_b) or (op.kind == "B" and i > last_f)}

    def duration(key: tuple[int, PipeOp]) -> float:
        stage, op = key
        n = counts[stage][op.chunk]
        head = stage == p - 1 and op.chunk == v - 1
        alone = unpaired_s * n if key in unpaired else 0.0
        if op.kind == "F":
            return body_f * n + (unit.head_fwd_s if head else 0.0) + alone
        return body_b * n + (unit.head_bwd_s if head else 0.0) + alone

    def dep(key: tuple[int, PipeOp]) -> tuple[int, PipeOp] | None:
        return dependency(key[1], key[0], p, v, 0)

    def transfer(key: tuple[int, PipeOp]) -> float:
        d = dep(key)
        return p2p_s if d is not None and d[0] != key[0] else 0.0

    runs = run_ops(lists, dep, duration, transfer)
    params = counts if model is None else [
        [n * model.layer_params() + (model.input_embedding_params() if (s, c) == (0, 0) else 0)
         + (model.head_params() if (s, c) == (p - 1, v - 1) else 0) for c, n in enumerate(chunks)]
        for s, chunks in enumerate(counts)]
    return max(r.end_s for r in runs), chunk_last_backwards(runs), chunk_gradient_shares(runs, params)


@dataclass(frozen=True)
class _Run:
    """An iteration case as priced: its model, the cost model of its largest chunk's layers in every chunk, its
    batch and its chunks' layers."""

    model: ModelSpec  # as published
    cm: CostModel  # of the priced model: the largest chunk's layers (⌈L / (p·v)⌉ evenly split) in every chunk
    layer_ratio: float  # published layers / priced layers
    dp: int
    micro_batches: int  # per pipeline and step, m
    seq_tokens: int
    layers: list[list[int]]  # each stage's chunks' layers (chunk_layers, or the run's layout)


def _run(cal: CalibrationSet, case: IterationCase, profile: Profile) -> _Run:
    model = cal.model(case.model)
    # the run's own micro-batch, whether or not the memory model lets it fit: iteration_memory judges that
    seq = case.seq_tokens or cal.seq_tokens
    training = dataclasses.replace(_training(cal, case, case.pp), capacity_tokens=-(-seq * case.micro_batch // case.cp))
    # Stages of unequal layers (Llama 3: 126 layers in 16 x 8 chunks): the unit prices a stage of the largest
    # layer count per chunk, each chunk then runs its own layers (chunk_layers, or the run's layout), and the step
    # end (gradient sync, optimizer) is that stage's, scaled by the layer ratio.
    if training.ep_comm_overlap and case.pp > 1 and case.chunks == 1:
        raise SpecError(f"calibration case {case.label!r}: ep_comm_overlap with pp > 1 needs an interleaved pipeline "
                        "(Megatron-core pairs passes under virtual stages only); give chunks > 1")
    layers = (parse_pipeline_layout(case.layout, case.pp, case.chunks, model.layers, training.mtp_layers)
              if case.layout else chunk_layers(model.layers, case.pp, case.chunks))
    priced = dataclasses.replace(model, layers=max(max(c) for c in layers) * case.pp * case.chunks)
    cm = _cost_model(cal, priced, case.gpus, training, profile)
    hdp = cm.setup.hdp  # DP × CP ranks per stage
    if hdp % case.cp:
        raise SpecError(f"calibration case {case.label!r}: {case.gpus} GPUs at tp={case.tp}, pp={case.pp} leave "
                        f"{hdp} ranks per stage, not a multiple of cp={case.cp}")
    dp = hdp // case.cp
    if case.global_batch % (case.micro_batch * dp):
        raise SpecError(f"calibration case {case.label!r}: global batch {case.global_batch} is not a multiple of "
                        f"micro-batch {case.micro_batch} x DP {dp}")
    return _Run(model, cm, model.layers / priced.layers, dp, case.global_batch // (case.micro_batch * dp), seq,
                layers)


def _embedding_text(cm: CostModel) -> str:
    """The note's words on the shared embedding's all-reduce between the first and the last stage, if any."""
    emb = cm.embedding_sync_s()
    return f" (the shared embedding's all-reduce, {emb:.3g} s, in the sync)" if emb else ""


def iteration_row(cal: CalibrationSet, case: IterationCase, profile: Profile) -> ValidationRow:
    """The iteration time of a row: its micro-batches through its pipeline schedule, then the gradient sync
    over the DP × CP ranks and the optimizer step."""
    run = _run(cal, case, profile)
    cm, m, hdp = run.cm, run.micro_batches, run.cm.setup.hdp
    inter = cm.setup.mesh.spans_domains(list(range(case.cp)))
    unit = cm.unit_cost([run.seq_tokens] * case.micro_batch, degree=case.cp, inter_node=inter, with_head=True)
    optimizer_s = cm.optimizer_step_s(hdp)
    layers = run.layers
    if cm.setup.training.zero_stage == 3:  # FSDP (pp = 1, TrainingSpec): each micro-batch a round of per-layer
        n = cm.layers_per_stage  # gathers and reduce-scatters (costmodel.zero)
        round_s = round_time_s((unit.fwd_s - unit.head_fwd_s) / n, (unit.bwd_s - unit.head_bwd_s) / n,
                               unit.head_fwd_s + unit.head_bwd_s, n, round_collectives(cm.setup, cm.profile))
        pipeline_s, sync_s = m * round_s, 0.0
        runs = f"{m} micro-batches, one FSDP round each"
        sync_text = (f"FSDP over DP {run.dp} x CP {case.cp}: {m} round(s) of {round_s:.3g} s, the per-layer "
                     f"all-gathers and reduce-scatters in them ({round_s - unit.total_s:.3g} s exposed a round)")
    else:
        p2p = cm.pp_p2p_s(unit.tokens_per_rank) if case.pp > 1 else 0.0
        unpaired = 0.0
        if cm.setup.training.ep_comm_overlap:  # what the overlap hid of a layer's pass, which a lone pass exposes
            n = cm.layers_per_stage
            unpaired = float(cm.ep_overlap_hidden_s(float(unit.tokens_per_rank), unit.fwd_compute_s / n,
                                                    unit.bwd_compute_s / n))
        pipeline_s, last_backwards, shares = pipeline_runs(case.pp, m, case.chunks, unit, p2p, layers, run.model,
                                                           unpaired)
        sync_s = cm.exposed_chunked_grad_sync_s(hdp, last_backwards, shares)
        schedule = f"interleaved, {case.chunks} chunks" if case.chunks > 1 else "1F1B"
        runs = f"{m} micro-batches, {schedule} on the event engine"
        sync_text = (f"DP {run.dp} x CP {case.cp}: gradient sync {cm.grad_sync_s(hdp):.3g} s ({sync_s:.3g} s "
                     "exposed)")
    priced = cm.model.layers
    note = "; ".join(x for x in (runs, _note(cm.setup.training),
                                 f"{sync_text} + optimizer {optimizer_s:.3g} s" + _embedding_text(cm),
                                 f"{run.model.layers} layers in chunks of up to {priced // (case.pp * case.chunks)} "
                                 f"({'layout ' + case.layout if case.layout else 'chunk_layers'}); gradient sync "
                                 f"and optimizer priced for {priced} layers, scaled by "
                                 f"{run.model.layers}/{priced}"
                                 if run.layer_ratio != 1 else "", case.note) if x)
    # The schedule ran each chunk's own layers: the breakdown is the busiest stage's work (its layers' share of the
    # priced stage, the head if it is the last; stages within a fraction of a percent can swap with the batch) and what
    # the schedule adds; the gradient sync and optimizer are the priced stage's, scaled by the layer ratio.
    ratio, head_s = run.layer_ratio, unit.head_fwd_s + unit.head_bwd_s
    work = [sum(n) / cm.layers_per_stage * (unit.total_s - head_s) + (head_s if s == case.pp - 1 else 0.0)
            for s, n in enumerate(layers)]
    busiest = int(np.argmax(work))
    share = sum(layers[busiest]) / cm.layers_per_stage
    emb = cm.embedding_sync_s()  # one embedding, whatever the layer count
    predicted = pipeline_s + (sync_s - emb + optimizer_s) * ratio + emb
    parts = {k: m * v * (float(busiest == case.pp - 1) if k == "head" else share) for k, v in unit.parts_s().items()}
    parts.update(schedule=pipeline_s - m * work[busiest], grad_sync=(sync_s - emb) * ratio + emb,
                 optimizer=optimizer_s * ratio)
    facets = row_facets(cm.setup.cluster.gpu, run.seq_tokens, case.pp, case.chunks, case.cp,
                        cm.setup.training.zero_stage, moe=cm.model.is_moe)
    return ValidationRow(case.label, "s", published_iteration_s(cal, case), predicted, note, parts, facets)


# ---- memory: does the published run fit in the GPU's memory as the cost model counts it? ---------------------
@dataclass(frozen=True)
class MemoryRow:
    """The predicted peak memory of one GPU of a published run (its busiest pipeline stage), next to the memory it
    ran in: every packaged run trained, so allocations and context over it are the memory model's error."""

    case: str
    peak_bytes: float
    hbm_bytes: float
    stage: int  # the busiest stage
    held_layers: int  # layer activations of one micro-batch that stage holds at its peak (Σ over chunks in flight)
    parts: dict[str, float]  # bytes: states, activations, recompute, logits, all-gather CP, context, fragmentation

    @property
    def allocated_bytes(self) -> float:
        """What the run allocates: the peak less the CUDA context and the planner's fragmentation reserve."""
        return self.peak_bytes - self.parts["context"] - self.parts["fragmentation"]

    @property
    def needed_bytes(self) -> float:
        """What the run must have of the GPU's memory: its allocations and the CUDA context (NCCL buffers included)."""
        return self.allocated_bytes + self.parts["context"]

    @property
    def headroom_bytes(self) -> float:
        """What the run left its allocator for fragmentation (negative: the predicted allocations do not fit)."""
        return self.hbm_bytes - self.needed_bytes

    @property
    def fits(self) -> bool:
        """The predicted allocations and context fit the GPU. The planner's fragmentation reserve is its safety
        margin, not memory a run must have: a run tuned to its GPU keeps fragmentation under it, and
        `headroom_bytes` says how much each one had."""
        return self.headroom_bytes >= 0

    @property
    def fits_with_reserve(self) -> bool:
        """The predicted peak with the planner's fragmentation reserve too fits the GPU."""
        return self.peak_bytes <= self.hbm_bytes


def chunk_layers(layers: int, p: int, v: int) -> list[list[int]]:
    """Layers in each chunk of each stage: ⌈L/(p·v)⌉ each, the layers short of that taken one at a time from
    the pipeline's first chunk (stage 0, chunk 0), its last (stage p − 1, chunk v − 1), then the second, the
    second to last... Llama 3 (126 layers on 16 x 8 chunks) removes one layer from the first and the last stage,
    whose first and last chunks hold the embedding and the output alone."""
    per = -(-layers // (p * v))
    out = [[per] * v for _ in range(p)]
    for i in range(per * p * v - layers):
        # chunk k of the pipeline is stage k % p's chunk k // p (Megatron's virtual stages)
        k = i // 2 if i % 2 == 0 else p * v - 1 - i // 2
        out[k % p][k // p] -= 1
    return out


_LAYOUT_SYMBOLS = {"E": "embedding", "t": "transformer layer", "m": "MTP layer", "L": "loss"}


def parse_pipeline_layout(layout: str, p: int, v: int, layers: int, mtp_layers: int = 0) -> list[list[int]]:
    """Layers in each chunk of each stage from Megatron-core's `pipeline_model_parallel_layout`: p·v virtual stages
    in pipeline order (k-th: stage k % p's chunk k // p) split by "|", each of E (the embedding), t (a transformer
    layer), m (an MTP depth), L (the loss); "(...)*n" and "t*n" repeat. The cost model prices the embedding on the
    first chunk, the MTP depths and the loss on the last (DeepSeek-V3's recipe: "Et|(tt|)*30mL"), so E, m and L
    are refused elsewhere; a string whose t count is not the model's, or whose stages are not p·v, is refused."""
    text = layout.replace(" ", "").replace(",", "")  # Megatron-core allows commas "cosmetically"
    while (expanded := re.sub(r"\(([^()]*)\)\*(\d+)", lambda g: g[1] * int(g[2]), text)) != text:
        text = expanded
    text = re.sub(r"([EtmL])\*(\d+)", lambda g: g[1] * int(g[2]), text)
    if bad := sorted(set(text) - set(_LAYOUT_SYMBOLS) - {"|"}):
        raise SpecError(f"pipeline layout {layout!r}: unknown symbol(s) {''.join(bad)!r}; use E, t, m, L, |, (...)*n")
    stages = text.split("|")
    if len(stages) != p * v:
        raise SpecError(f"pipeline layout {layout!r}: {len(stages)} virtual stages, not pp x chunks = {p * v}")
    if (n := text.count("t")) != layers:
        raise SpecError(f"pipeline layout {layout!r}: {n} transformer layers (t), the model has {layers}")
    if text.count("m") != mtp_layers:
        raise SpecError(f"pipeline layout {layout!r}: {text.count('m')} MTP layers (m), the run has {mtp_layers}")
    for symbol, home in (("E", 0), ("m", p * v - 1), ("L", p * v - 1)):
        if any(symbol in stage for k, stage in enumerate(stages) if k != home):
            where = "first" if home == 0 else "last"
            raise SpecError(f"pipeline layout {layout!r}: the cost model prices the {_LAYOUT_SYMBOLS[symbol]} "
                            f"({symbol}) on the pipeline's {where} virtual stage only")
    out = [[0] * v for _ in range(p)]
    for k, stage in enumerate(stages):
        out[k % p][k // p] = stage.count("t")
    return out


def iteration_memory(cal: CalibrationSet, case: IterationCase, profile: Profile) -> MemoryRow:
    """Peak memory per GPU of a row as priced: each stage's model states (its layers, embedding or head), the
    activations of the chunk forwards its schedule holds at once (the event engine's op order, stage_ops), full
    recompute's one-layer working set, the loss head on the last stage, all-gather CP's gathered K/V, and the
    context and fragmentation reserves (costmodel.memory); the busiest stage's sum."""
    run = _run(cal, case, profile)
    cm, setup, p, v = run.cm, run.cm.setup, case.pp, case.chunks
    tr = setup.training
    layers = run.layers
    tokens = run.seq_tokens * case.micro_batch / case.cp
    gathered = (allgather_cp_working_bytes(run.model, case.tp, tr.dtype_bytes, run.seq_tokens * case.micro_batch)
                if case.cp > 1 and tr.cp == "allgather" else 0.0)
    best: MemoryRow | None = None
    for s in range(p):
        held = peak = 0
        for op in stage_ops(p, s, [1] * run.micro_batches, v):
            held += layers[s][op.chunk] if op.kind == "F" else -layers[s][op.chunk]
            peak = max(peak, held)
        if tr.ep_comm_overlap:  # Megatron-core's combined 1F1B warms up one chunk forward more (its pairs' spare)
            peak += max(layers[s])
        parts = {"states": model_state_bytes(setup, s, sum(layers[s])), "activations": peak * tokens * cm.a_tok,
                 "recompute": recompute_working_bytes(tokens, cm),
                 "logits": logits_bytes(tokens, setup) if s == p - 1 else 0.0, "all-gather CP": gathered,
                 "context": cm.budget.ctx_bytes, "fragmentation": cm.budget.frag_bytes}
        row = MemoryRow(case.label, sum(parts.values()), float(setup.cluster.gpu_memory_bytes), s, peak, parts)
        if best is None or row.peak_bytes > best.peak_bytes:
            best = row
    assert best is not None
    return best


def with_attention_kernel(cal: CalibrationSet, kernel: str) -> CalibrationSet:
    """`cal` with every run priced with attention `kernel` (TrainingSpec.attention_kernel) over what it ran."""
    return dataclasses.replace(cal, training={**cal.training, "attention_kernel": kernel}, iteration_cases=[
        dataclasses.replace(c, training={**c.training, "attention_kernel": kernel}) for c in cal.iteration_cases])


def validate_cost_model(profile: str | Profile | None = None, name: str = "korthikanti2022",
                        attention_kernel: str | None = None) -> ValidationReport:
    """Every case of the calibration set `name` on `profile` (a Profile, a name or path; default: the
    set's cluster's profile); `attention_kernel`: price every run with that kernel instead of its own."""
    cal = load_calibration_set(name)
    if attention_kernel is not None:
        cal = with_attention_kernel(cal, attention_kernel)
    if not isinstance(profile, Profile):
        profile = load_profile(profile or load_cluster(cal.cluster).profile)
    rows = [r for case in cal.layer_cases for r in layer_rows(cal, case, profile)]
    rows += [iteration_row(cal, case, profile) for case in cal.iteration_cases]
    memory = tuple(iteration_memory(cal, case, profile) for case in cal.iteration_cases)
    return ValidationReport(name, cal.source, profile.fingerprint.name, tuple(rows), memory, attention_kernel)

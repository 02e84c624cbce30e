"""The checks a HuggingFace model replay (`--hf-config`, `--hf-weights`) needs before any rank works, free
of torch and transformers like planner/runtime/launch.py: which architectures the replay builds, and
what it cannot replay faithfully. The model itself is planner/runtime/hf.py."""

from __future__ import annotations

from pathlib import Path

from costmodel.specs import ModelSpec, SpecError
from planner.plan import Plan, PlanError
from profiles.table import read_json

HF_MODEL_TYPES = ("llama", "qwen2", "mistral")  # dense decoders whose attention core the replay routes


def hf_config_path(path: str | Path) -> Path:
    """config.json itself, or the one inside a model directory."""
    p = Path(path)
    return p / "config.json" if p.is_dir() else p


def read_hf_config(path: str | Path) -> dict:
    p = hf_config_path(path)
    d = read_json(p, "HuggingFace config.json (--hf-config)", PlanError)
    if not isinstance(d, dict):
        raise PlanError(f"--hf-config {p}: expected a JSON object (a HuggingFace config.json)")
    return d


def check_attention_window(spec: ModelSpec, plan: Plan, where: str) -> None:
    """PlanError if `spec` windows or chunks attention shorter than the plan's longest sequence: the replay's
    attention is full causal, which is the same where the window (chunk) covers every sequence
    (costmodel.specs.HFConfig.attention_window gives a HF model's)."""
    longest = max(q.length for st in plan.steps for q in st.sequences)
    if spec.windowed_fraction and spec.local_attention < longest:
        kind = "sliding_window" if spec.sliding_window else "attention_chunk"
        raise PlanError(f"{where}: {kind} {spec.local_attention} is shorter than the plan's longest sequence "
                        f"({longest} tokens) and the replay's attention is full causal; plan shorter sequences")


def hf_model_spec(config: str | Path, weights: str | Path | None, plan: Plan, model: str | None) -> ModelSpec:
    """The ModelSpec of a HF config the replay can build for `plan`; PlanError otherwise."""
    p = hf_config_path(config)
    if model is not None:
        raise PlanError(f"--model {model} and --hf-config {p} both name the model; pass one of them")
    d = read_hf_config(p)
    kind = d.get("model_type")
    if kind not in HF_MODEL_TYPES:
        raise PlanError(f"--hf-config {p}: model_type {kind!r} is not replayed; supported: {', '.join(HF_MODEL_TYPES)}")
    try:
        spec = ModelSpec.from_hf_config(p)
    except SpecError as e:
        raise PlanError(str(e)) from None
    m = plan.mesh
    if m.tp > 1:
        raise PlanError(f"--hf-config {p}: HuggingFace models replay with pp and context parallelism but not tp > 1 "
                        f"(the plan has tp = {m.tp}); plan with tp 1 or replay the built-in model (--model)")
    if float(d.get("attention_dropout") or 0.0) != 0.0:
        raise PlanError(f"--hf-config {p}: attention_dropout {d['attention_dropout']} is not replayed (the CP "
                        "attention has no dropout); set it to 0")
    check_attention_window(spec, plan, f"--hf-config {p}")
    chunks = m.pp * plan.steps[0].chunks_per_stage
    if spec.layers < chunks:
        raise PlanError(f"--hf-config {p} has {spec.layers} layers, fewer than the plan's {chunks} pipeline chunks "
                        "(pp × v)")
    if weights is not None and not Path(weights).exists():
        raise PlanError(f"--hf-weights {weights}: no such file or directory (a .safetensors file, or a directory "
                        "with model.safetensors or model.safetensors.index.json)")
    return spec

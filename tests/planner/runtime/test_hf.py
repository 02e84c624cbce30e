"""planner/runtime/hf.py: HuggingFace Llama / Qwen2 / Mistral decoders replayed with meshplan's attention.
In one process: the wrapped model equals stock transformers, a stage materialises only its parameters,
a safetensors checkpoint loads; under torchrun (gloo, CPU): CP and pp plans match the --check reference.
Skipped without the hf extra (transformers, safetensors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from planner.plan import (Mesh, Piece, PipelineSection, Plan, PlanError, Predicted, Sequence, Step,  # noqa: E402
                          Unit, validate, zigzag_tokens_per_rank)
from planner.runtime.check import max_rel_grad_err  # noqa: E402
from planner.runtime.cp import PackedAttention, shard_layout, unit_documents  # noqa: E402
from planner.runtime.hf import build_hf_model, hf_config, hf_name  # noqa: E402
from planner.runtime.launch import preflight  # noqa: E402
from planner.runtime.model import ModelConfig, TokenSource, virtual_stage_layers  # noqa: E402
from planner.runtime.hf_spec import hf_model_spec  # noqa: E402
from planner.runtime.inputs import unit_inputs  # noqa: E402
from planner.runtime.step import token_loss  # noqa: E402

GRAD_TOL, LOSS_TOL = 1e-4, 1e-5  # fp32, as the built-in model's replay tests
CPU = torch.device("cpu")
_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 512}
CONFIGS = {  # GQA 4/2 heads; each architecture's own RoPE base, norm eps, tying, biases
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **_TINY, "rope_theta": 500000.0,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **_TINY, "rope_theta": 1000000.0,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "mistral": {"model_type": "mistral", "architectures": ["MistralForCausalLM"], **_TINY, "rope_theta": 10000.0,
                "rms_norm_eps": 1e-5, "sliding_window": 4096, "tie_word_embeddings": False},
}


def write_config(d: Path, kind: str, **over) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({**CONFIGS[kind], **over}))
    return d / "config.json"


def make_step(step: int, hdp: int, seqs: dict[int, int], units: list[tuple], order: dict[int, list[int]]) -> Step:
    """units: (id, hdp_ranks, [(seq, start, end), ...])."""
    return Step(step=step, global_tokens=sum(seqs.values()), sequences=[Sequence(i, n) for i, n in seqs.items()],
                units=[Unit(id=i, hdp_ranks=tuple(r), pieces=tuple(Piece(*p) for p in ps), offload_ratio=0.0,
                            tokens_per_rank=zigzag_tokens_per_rank([p[2] - p[1] for p in ps], len(r)))
                       for i, r, ps in units],
                order=order, predicted=Predicted(1.0, 0.5, [0.5] * hdp, [1e6] * hdp))


def hdp_plan() -> Plan:
    """2 HDP ranks: a CP unit over both (two documents, 70 and 30 tokens: padding), a packed bin each, a
    sequence split over two units."""
    seqs = {0: 70, 1: 30, 2: 45, 3: 50}
    units = [(0, [0, 1], [(0, 0, 70), (1, 0, 30)]), (1, [0], [(2, 0, 45), (3, 0, 20)]), (2, [1], [(3, 20, 50)])]
    plan = Plan(meta={"model": "tiny", "strategy": "hand-built"}, mesh=Mesh(2, 1, 1, 2),
                steps=[make_step(0, 2, seqs, units, {0: [0, 1], 1: [0, 2]})])
    validate(plan)
    return plan


def pp_plan() -> Plan:
    """pp = 2, one pipeline: three micro-batches under 1F1B."""
    seqs = {0: 40, 1: 25, 2: 33, 3: 18}
    units = [(0, [0], [(0, 0, 40)]), (1, [0], [(1, 0, 25), (2, 0, 33)]), (2, [0], [(3, 0, 18)])]
    st = replace(make_step(0, 1, seqs, units, {0: [0, 1, 2]}), pipeline=PipelineSection("1f1b", 1))
    plan = Plan(meta={"model": "tiny", "strategy": "hand-built"}, mesh=Mesh(2, 1, 2, 1), steps=[st])
    validate(plan)
    return plan


def stock(config: Path, model) -> torch.nn.Module:
    """Stock transformers (its own SDPA attention and masks) with `model`'s weights."""
    lm = transformers.AutoModelForCausalLM.from_config(hf_config(config), attn_implementation="sdpa",
                                                       dtype=torch.float32)
    want = {hf_name(n): p.detach() for n, p in model.named_parameters()}
    missing, unexpected = lm.load_state_dict(want, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: the head is the embedding
    return lm


# -- in one process ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_packed_bin_equals_stock_transformers_per_document(kind, tmp_path):
    """Two documents packed in one bin through meshplan's attention give stock transformers' loss and
    gradients for each document run alone (positions restart per document)."""
    cfg = write_config(tmp_path, kind)
    spec = hf_model_spec(cfg, None, hdp_plan(), None)
    model = build_hf_model(cfg, ModelConfig(spec), seed=1, device=CPU)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights large enough that the RoPE base shows in the loss (0.02: nearly uniform attention)
        for n, p in model.named_parameters():
            if not n.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    lm = stock(cfg, model)
    step = hdp_plan().steps[0]
    unit = step.units[0]
    tokens = TokenSource(256, seed=5).tokens(0, step.sequences)
    lay = shard_layout(unit_documents(unit.pieces), 1, 0)
    inp, lab, pos = unit_inputs(tokens, lay)
    loss = token_loss(model, model(inp, pos, PackedAttention(lay)), lab, 100)
    loss.backward()
    ref = 0.0
    for s in (0, 1):
        out = lm(input_ids=tokens[s].ids[None])
        part = token_loss(model, out.logits[0], tokens[s].labels, 100)
        part.backward()
        ref += float(part.detach())
    assert abs(float(loss.detach()) - ref) < LOSS_TOL
    ours = dict(model.named_parameters())
    theirs = dict(lm.named_parameters())
    assert max_rel_grad_err(torch.nn.ParameterList(ours.values()),
                            torch.nn.ParameterList(theirs[hf_name(n)] for n in ours)) < GRAD_TOL


def test_rope_base_norm_eps_and_tying_come_from_the_config(tmp_path):
    cfg = write_config(tmp_path, "llama")
    model = build_hf_model(cfg, ModelConfig(hf_model_spec(cfg, None, hdp_plan(), None)), seed=0, device=CPU)
    assert model.head is None  # tied
    assert torch.allclose(model.rotary.inv_freq, 1.0 / 500000.0 ** (torch.arange(0, 16, 2).float() / 16))
    assert model.norm.variance_epsilon == 1e-6


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_stage_materialises_only_its_parameters(kind, tmp_path):
    cfg = write_config(tmp_path, kind)
    spec = hf_model_spec(cfg, None, pp_plan(), None)
    full = build_hf_model(cfg, ModelConfig(spec), seed=0, device=CPU)
    ranges = tuple(virtual_stage_layers(2, 2, 1))
    whole = dict(full.named_parameters())
    for s in (0, 1):
        part = build_hf_model(cfg, ModelConfig(spec), seed=0, device=CPU, stage=(ranges, 2, s))
        held = {n for n, p in part.named_parameters() if p.numel()}
        assert all(n.startswith(f"layers.{s}.") for n in held if n.startswith("layers."))
        assert ("embed.weight" in held) == (s == 0 or spec.tied_embeddings)
        assert ("norm.weight" in held) == (s == 1)
        assert ("head.weight" in held) == (s == 1 and not spec.tied_embeddings)
        assert sum(p.numel() for p in part.parameters()) < spec.parameters
        for n in held:  # the same values the whole model gets
            assert torch.equal(dict(part.named_parameters())[n], whole[n])


def test_checkpoint_tensors_load_by_their_hf_names(tmp_path):
    cfg = write_config(tmp_path, "qwen2")
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(hf_config(cfg), dtype=torch.float32)
    safetensors_torch.save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, tmp_path / "w.safetensors")
    spec = hf_model_spec(cfg, tmp_path / "w.safetensors", pp_plan(), None)
    model = build_hf_model(cfg, ModelConfig(spec), 0, CPU, tmp_path / "w.safetensors",
                           (tuple(virtual_stage_layers(2, 2, 1)), 2, 1))
    sd = lm.state_dict()
    for n, p in model.named_parameters():
        assert p.numel() == 0 or torch.equal(p, sd[hf_name(n)]), n
    with pytest.raises(ValueError, match="no tensor 'model.layers.1.mlp.up_proj.weight'"):
        safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items() if "layers.1.mlp.up" not in k},
                                    tmp_path / "cut.safetensors")
        build_hf_model(cfg, ModelConfig(spec), 0, CPU, tmp_path / "cut.safetensors")


def test_refusals(tmp_path):
    cfg = write_config(tmp_path / "a", "llama")
    hdp_plan().save(tmp_path / "plan.json")
    with pytest.raises(PlanError, match="not tp > 1"):
        hf_model_spec(cfg, None, Plan(meta={}, mesh=Mesh(2, 2, 1, 1), steps=[]), None)
    with pytest.raises(PlanError, match="both name the model"):
        preflight(tmp_path / "plan.json", 2, "tiny", hf_config=cfg)
    with pytest.raises(PlanError, match="needs --hf-config"):
        preflight(tmp_path / "plan.json", 2, hf_weights=tmp_path / "w.safetensors")
    with pytest.raises(PlanError, match="sliding_window 64 is shorter"):
        preflight(tmp_path / "plan.json", 2, hf_config=write_config(tmp_path / "b", "mistral", sliding_window=64))
    with pytest.raises(PlanError, match="model_type 'gpt2'"):
        preflight(tmp_path / "plan.json", 2, hf_config=write_config(tmp_path / "c", "llama", model_type="gpt2"))
    assert preflight(tmp_path / "plan.json", 2, hf_config=cfg)[1].tied_embeddings


# -- torchrun -------------------------------------------------------------------------------------

def replay(nproc: int, plan: Plan, cwd: Path, *args: str) -> dict:
    plan.save(cwd / "plan.json")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "planner.runtime", "plan.json", "--check", *args]
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=180,
                         env={**env, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    checks = [json.loads(line)["check"] for line in res.stdout.splitlines() if line.startswith('{"check"')]
    assert len(checks) == 1, res.stdout
    c = checks[0]
    assert c["max_rel_grad_err"] < GRAD_TOL and c["loss_abs_err"] < LOSS_TOL, c
    return c


@pytest.mark.torchrun
@pytest.mark.parametrize("kind,args", [("llama", ("--cp", "ring")), ("qwen2", ("--cp", "allgather", "--recompute",
                                                                           "selective"))])
def test_cp_plan_matches_the_reference(kind, args, tmp_path):
    write_config(tmp_path, kind)
    replay(2, hdp_plan(), tmp_path, "--hf-config", "config.json", *args)


@pytest.mark.torchrun
def test_pp_plan_from_a_safetensors_checkpoint_matches_the_reference(tmp_path):
    """A tied Llama saved as transformers saves it (no lm_head tensor): each stage reads its tensors, the
    tied embedding's gradient is summed over the first and last stage."""
    cfg = write_config(tmp_path / "model", "llama")
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(hf_config(cfg), dtype=torch.float32)
    safetensors_torch.save_file({k: v.contiguous() for k, v in lm.state_dict().items() if k != "lm_head.weight"},
                                tmp_path / "model" / "model.safetensors")
    replay(2, pp_plan(), tmp_path, "--hf-config", "model", "--hf-weights", "model", "--recompute", "full")

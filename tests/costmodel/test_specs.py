"""Specs and presets: parameter counts against published figures, validation, HF config reading."""

import json

import pytest

from costmodel.presets import cluster_names, load_cluster, load_model, model_names
from costmodel.specs import ModelSpec, Setup, SpecError, TrainingSpec

REQUIRED_MODELS = ["llama-7b", "llama-13b", "llama-30b", "llama-70b", "llama2-7b", "llama2-13b", "mistral-8x7b",
                   "mistral-8x22b", "llama3-8b",
                   "llama3-70b", "llama3-405b", "qwen2.5-7b", "qwen2.5-72b", "tiny"]


def test_all_presets_present():
    assert set(REQUIRED_MODELS) <= set(model_names())
    assert {"dgx-h100", "dgx-a100", "hgx-h200", "h800-cluster", "local-cpu"} <= set(cluster_names())


@pytest.mark.parametrize("name,total,active", [
    ("llama2-7b", 6.74e9, 6.74e9), ("llama2-13b", 13.02e9, 13.02e9), ("llama3-8b", 8.03e9, 8.03e9), ("llama3-70b", 70.6e9, 70.6e9), ("mistral-8x22b", 141e9, 39e9),
    ("llama3-405b", 405.9e9, 405.9e9), ("mistral-8x7b", 46.7e9, 12.9e9)])
def test_parameter_counts(name, total, active):
    m = load_model(name)
    assert m.parameters == pytest.approx(total, rel=0.005)
    assert m.active_parameters == pytest.approx(active, rel=0.005)


def test_hand_counted_tiny_parameters():
    m = load_model("tiny")  # L=2, h=64, q=4x16, kv=2x16, f=128, V=256, untied
    attn = 64 * (64 + 2 * 32) + 64 * 64
    mlp = 3 * 64 * 128
    layer = attn + mlp + 2 * 64
    assert m.parameters == 2 * layer + 2 * 256 * 64 + 64


def test_bad_model_values_rejected():
    with pytest.raises(SpecError, match="kv_heads"):
        ModelSpec(name="x", layers=2, hidden=64, heads=4, kv_heads=3, head_dim=16, ffn=128, vocab=10)
    with pytest.raises(SpecError, match="layers: expected an integer > 0, got 0"):
        ModelSpec(name="x", layers=0, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=10)
    with pytest.raises(SpecError, match="unknown field"):
        ModelSpec.from_dict({"name": "x", "layerz": 3})


def test_bad_training_and_layout_rejected():
    with pytest.raises(SpecError, match="recompute"):
        TrainingSpec(recompute="sometimes")
    with pytest.raises(SpecError, match="pp=33 exceeds the 32 layers of llama-7b"):
        Setup(load_model("llama-7b"), load_cluster("dgx-h100"), TrainingSpec(pp=33))
    with pytest.raises(SpecError, match="NVLink"):
        Setup(load_model("llama3-405b"), load_cluster("dgx-h100"), TrainingSpec(tp=16))
    with pytest.raises(SpecError, match="whole number"):
        load_cluster("dgx-h100").with_gpus(12)


def test_unknown_preset_message():
    with pytest.raises(SpecError, match="unknown model 'nope'.*llama-7b"):
        load_model("nope")


def test_hf_config(tmp_path):
    cfg = {"architectures": ["MixtralForCausalLM"], "num_hidden_layers": 32, "hidden_size": 4096,
           "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000,
           "num_local_experts": 8, "num_experts_per_tok": 2, "tie_word_embeddings": False}
    d = tmp_path / "mixtral"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    m = load_model(str(d / "config.json"))
    assert m == ModelSpec(**{**load_model("mistral-8x7b").__dict__, "name": "mixtral", "source": m.source})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SpecError, match="truncated or corrupt"):
        load_model(str(tmp_path / "bad.json"))


def test_spec_json_round_trip():
    for n in model_names():
        m = load_model(n)
        assert ModelSpec.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_training_spec_fields_typed():
    with pytest.raises(SpecError, match="training: tp: expected an integer > 0, got 2.0"):
        TrainingSpec(tp=2.0)
    with pytest.raises(SpecError, match=r"frag_fraction: expected a finite number in \[0, 0.5\)"):
        TrainingSpec(frag_fraction=0.5)
    with pytest.raises(SpecError, match="plan.json: meta.training: pp: expected an integer > 0, got true"):
        TrainingSpec.from_dict({"pp": True}, "plan.json: meta.training")
    with pytest.raises(SpecError, match=r"unknown field\(s\) \['zero'\]"):
        TrainingSpec.from_dict({"zero": 1})
    assert TrainingSpec.from_dict(TrainingSpec(tp=2).to_dict()) == TrainingSpec(tp=2)
    # plans written before `loss` said fused_loss; both kinds read back, and the default is not written
    assert TrainingSpec.from_dict({"fused_loss": False}).loss == "fp32"
    assert TrainingSpec.from_dict({"fused_loss": True}) == TrainingSpec()
    assert "loss" not in TrainingSpec().to_dict() and TrainingSpec(loss="in_place").to_dict()["loss"] == "in_place"
    with pytest.raises(SpecError, match="loss"):
        TrainingSpec.from_dict({"loss": "chunked"})
    with pytest.raises(SpecError, match="fused_loss"):  # not a bool: not read as an old plan's key
        TrainingSpec.from_dict({"fused_loss": 1})


def test_hf_config_nulls_mean_absent(tmp_path):
    cfg = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": None,
           "head_dim": None, "intermediate_size": 128, "vocab_size": 256, "num_local_experts": None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = load_model(str(tmp_path / "config.json"))
    assert (m.kv_heads, m.head_dim, m.experts) == (4, 16, 1)


@pytest.mark.parametrize("name,published", [("gpt-22b", 22e9), ("gpt-175b", 174.6e9), ("gpt-530b", 530e9),
                                            ("gpt-1t", 1008e9)])
def test_gpt_parameter_counts_match_published_sizes(name, published):
    # Korthikanti 2022 / Narayanan 2021 name the sizes; 175B with V = 51,200 and learned positions is 174.6B
    m = load_model(name)
    assert (m.mlp, m.norm, m.position, m.tied_embeddings) == ("gelu", "layernorm", "learned", True)
    assert m.parameters == pytest.approx(published, rel=0.005)


def test_hand_counted_gpt_block_parameters():
    # GPT block: QKV 3h² + 3h, O h² + h, MLP 2hf + f + h, 2 LayerNorms 4h; tied V·h, positions P·h, final LN 2h
    h, f, v, pos, layers = 64, 256, 100, 32, 3
    m = ModelSpec(name="g", layers=layers, hidden=h, heads=4, kv_heads=4, head_dim=16, ffn=f, vocab=v,
                  tied_embeddings=True, norm="layernorm", mlp="gelu", linear_bias=True, position="learned",
                  max_positions=pos)
    layer = 3 * h * h + 3 * h + h * h + h + 2 * h * f + f + h + 4 * h
    assert m.layer_params() == layer
    assert m.parameters == layers * layer + v * h + pos * h + 2 * h


def test_learned_positions_need_a_table():
    with pytest.raises(SpecError, match="max_positions"):
        ModelSpec(name="x", layers=2, hidden=64, heads=4, kv_heads=4, head_dim=16, ffn=128, vocab=10,
                  position="learned")
    with pytest.raises(SpecError, match="mlp"):
        ModelSpec.from_dict({"name": "x", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 4, "head_dim": 16,
                             "ffn": 128, "vocab": 10, "mlp": "relu"})


def test_hf_config_sliding_window(tmp_path):
    base = {"num_hidden_layers": 12, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128,
            "vocab_size": 256}

    def spec(**extra):
        (tmp_path / "config.json").write_text(json.dumps({**base, **extra}))
        m = load_model(str(tmp_path / "config.json"))
        return m.sliding_window, m.full_attention_layers

    assert spec(model_type="mistral", sliding_window=4096) == (4096, 0)  # every layer windowed
    assert spec(model_type="mistral") == (4096, 0)  # transformers' MistralConfig default
    assert spec(model_type="mistral", sliding_window=None) == (0, 0)  # Mistral v0.2 on: full attention
    assert spec(model_type="qwen2", sliding_window=32768) == (0, 0)  # only use_sliding_window turns it on
    # on, it windows the layers from max_window_layers (default 28) on: none of these 12, then 8 of them
    assert spec(model_type="qwen2", sliding_window=32768, use_sliding_window=True) == (0, 0)
    assert spec(model_type="qwen2", sliding_window=32768, use_sliding_window=True, max_window_layers=4) == (32768, 4)
    assert spec(model_type="qwen2", use_sliding_window=True, max_window_layers=4) == (4096, 4)  # its default window
    assert spec(model_type="gemma3_text", sliding_window=1024, sliding_window_pattern=6) == (1024, 2)
    assert spec(model_type="gemma2", sliding_window=4096) == (4096, 6)  # alternating
    assert spec(model_type="gemma2", sliding_window=4096, layer_types=["full_attention"] * 12) == (0, 0)
    layer_types = ["sliding_attention", "full_attention"] * 6  # GPT-OSS
    assert spec(model_type="gpt_oss", sliding_window=128, layer_types=layer_types) == (128, 6)
    with pytest.raises(SpecError, match="full_attention_layers \\(2\\) needs a sliding_window"):
        ModelSpec(**{**load_model("tiny").__dict__, "full_attention_layers": 2})
    with pytest.raises(SpecError, match="full_attention_layers \\(3\\) cannot exceed layers \\(2\\)"):
        ModelSpec(**{**load_model("tiny").__dict__, "sliding_window": 8, "full_attention_layers": 3})
    assert ModelSpec(**{**load_model("tiny").__dict__, "sliding_window": 8, "full_attention_layers": 1}
                     ).windowed_fraction == 0.5

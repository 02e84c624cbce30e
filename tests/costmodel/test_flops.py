"""FLOP formulas: a layer counted by hand, zigzag shards balanced."""

import dataclasses
import math

import numpy as np
import pytest

from costmodel import flops
from costmodel.presets import load_model


def test_small_layer_flops_by_hand():
    m = load_model("tiny")  # h=64, q=64, kv=32, f=128
    s = 10
    qkv = 2 * s * 64 * (64 + 64)
    out = 2 * s * 64 * 64
    mlp = 6 * s * 64 * 128
    attn = 4 * (s * (s + 1) / 2) * 64  # causal pairs incl. diagonal
    assert flops.layer_flops_fwd([s], m)[0] == pytest.approx(qkv + out + mlp + attn)
    assert flops.attention_flops_fwd([s], m, causal_halved=False)[0] == 4 * s * s * 64


@pytest.mark.parametrize("s,d", [(4096, 4), (1000, 3), (2**21, 256), (96, 8)])
def test_zigzag_shards_equal_and_sum_to_whole(s, d):
    shares = flops.zigzag_shard_pairs(s, d)
    assert len(shares) == d
    assert np.allclose(shares, shares[0])
    padded = 2 * d * math.ceil(s / (2 * d))
    assert shares.sum() == pytest.approx(flops.causal_pairs(padded))


@pytest.mark.parametrize("name", ["gpt-22b", "gpt-175b", "gpt-530b", "gpt-1t"])
def test_gpt_model_flops_match_megatron_formula(name):
    # Narayanan et al. 2021 (Megatron-LM's MFU): 72·B·s·L·h²·(1 + s/(6h) + V/(12·h·L)), attention unhalved
    m, batch, s = load_model(name), 8, 2048
    L, h, V = m.layers, m.hidden, m.vocab
    megatron = 72 * batch * s * L * h * h * (1 + s / (6 * h) + V / (12 * h * L))
    assert flops.model_flops([s] * batch, m, causal_halved=False) == pytest.approx(megatron, rel=1e-12)


def test_gelu_mlp_has_two_gemms():
    gpt = load_model("gpt-22b")
    swiglu = dataclasses.replace(gpt, mlp="swiglu")
    h, f = gpt.hidden, gpt.ffn
    assert flops.linear_flops_per_token(swiglu) - flops.linear_flops_per_token(gpt) == 2 * h * f


def test_sliding_window_pairs_and_flops_by_hand():
    # a window of 4 keys: rows 0..3 attend 1..4 keys, every later row 4: s = 10 gives 10 + 6 * 4 = 34 pairs
    assert flops.window_pairs(10, 4) == 34 and flops.window_pairs(3, 4) == 6  # up to w: the causal triangle
    m = dataclasses.replace(load_model("tiny"), sliding_window=4, full_attention_layers=1)  # 2 layers, 1 windowed
    q = m.q_width
    assert flops.attention_flops_fwd(10, m) == pytest.approx(4 * q * (0.5 * 55 + 0.5 * 34))
    # unhalved (PaLM): the full square, a windowed layer what the square would be under its window, 2·34 − 10
    assert flops.attention_flops_fwd(10, m, causal_halved=False) == pytest.approx(4 * q * (0.5 * 100 + 0.5 * 58))
    assert flops.attention_flops_fwd(4, m) == flops.attention_flops_fwd(4, load_model("tiny"))


def test_chunked_attention_pairs_and_flops_by_hand():
    # chunks of 4: s = 10 is two causal squares of 4 (10 pairs each) and one of 2 (3 pairs)
    assert flops.chunk_pairs(10, 4) == 23 and flops.chunk_pairs(8, 4) == 20 and flops.chunk_pairs(3, 4) == 6
    m = dataclasses.replace(load_model("tiny"), attention_chunk=4, full_attention_layers=1)  # 2 layers, 1 chunked
    q = m.q_width
    assert flops.attention_flops_fwd(10, m) == pytest.approx(4 * q * (0.5 * 55 + 0.5 * 23))
    # unhalved: a chunked layer counts its chunks' squares, 16 + 16 + 4 = 2·23 − 10
    assert flops.attention_flops_fwd(10, m, causal_halved=False) == pytest.approx(4 * q * (0.5 * 100 + 0.5 * 36))


def test_mtp_depths_in_the_training_flops():
    """An MTP depth adds, 3× forward, one more decoder layer as the last stage holds them (DeepSeek-V3 on 16 stages:
    an MoE layer, not the mean with its 3 dense ones), the 2h -> h projection and the LM head again."""
    from costmodel.presets import load_cluster
    from costmodel.specs import Setup, TrainingSpec

    m = load_model("deepseek-v3")
    cluster = load_cluster("dgx-h100").with_gpus(1024)
    plain, mtp = (Setup(m, cluster, TrainingSpec(tp=8, ep=8, pp=16, mtp_layers=k)) for k in (0, 1))
    s = [4096, 1000]
    moe = m.layer_kinds()[0][1]
    assert moe.is_moe and mtp.stage_model.dense_layers == 0
    depth = (flops.layer_flops_fwd(s, moe).sum() + 4 * m.hidden**2 * sum(s) + flops.lm_head_flops_fwd(sum(s), m))
    assert flops.training_flops(s, plain) == flops.model_flops(s, m)
    assert flops.training_flops(s, mtp) == pytest.approx(flops.model_flops(s, m) + 3 * depth, rel=1e-12)
    assert flops.mtp_flops(s, moe, 2) == pytest.approx(6 * depth, rel=1e-12)

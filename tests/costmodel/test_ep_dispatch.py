"""DeepEP's flex dispatcher, node-limited routing and Megatron-core's EP all-to-all overlap (costmodel.moe,
costmodel.timing)."""

import dataclasses
import itertools
import json
from fractions import Fraction

import numpy as np
import pytest

from costmodel.moe import DEEPEP_SMS, ExpertLayout, dispatch_bytes, moe_comm_fwd_s, remote_domains_per_token
from costmodel.presets import load_cluster, load_model
from costmodel.specs import HFConfig, ModelSpec, Setup, SpecError, TrainingSpec
from costmodel.timing import _TOKEN_GRID, CostModel
from profiles.table import load_profile

S = float(_TOKEN_GRID[150])
_PROFILE = load_profile("h100-sxm.analytic")


def _toy(experts: int, top_k: int, groups: int = 1, per_token: int = 1) -> ModelSpec:
    return ModelSpec(name="toy", layers=2, hidden=64, heads=2, kv_heads=2, head_dim=32, ffn=32, vocab=128,
                     experts=experts, top_k=top_k, expert_groups=groups, groups_per_token=per_token)


def _brute_remote(experts: int, top_k: int, groups: int, per_token: int, domains: int) -> Fraction:
    """Exact mean of the remote domains hit: every origin domain, every choice of groups, then of experts."""
    per_group, per_domain = experts // groups, experts // domains
    total, count = Fraction(0), 0
    for chosen in itertools.combinations(range(groups), per_token):
        pool = [e for g in chosen for e in range(g * per_group, (g + 1) * per_group)]
        for picks in itertools.combinations(pool, top_k):
            hit = {e // per_domain for e in picks}
            for origin in range(domains):
                total += len(hit - {origin})
                count += 1
    return total / count


@pytest.mark.parametrize("experts,top_k,groups,per_token,domains", [
    (8, 2, 1, 1, 2), (8, 3, 1, 1, 4), (16, 4, 4, 2, 2), (16, 4, 4, 2, 4), (16, 3, 2, 1, 4), (12, 2, 1, 1, 3),
    (24, 4, 6, 2, 4), (12, 3, 3, 2, 4), (24, 2, 4, 3, 6)])  # the last three: groups straddling domains
def test_remote_domains_per_token_is_the_exact_mean(experts, top_k, groups, per_token, domains):
    model = _toy(experts, top_k, groups, per_token)
    want = _brute_remote(experts, top_k, groups, per_token, domains)
    assert remote_domains_per_token(model, domains) == pytest.approx(float(want), rel=1e-12)


def test_node_limited_routing_sends_deepseek_v3_to_fewer_nodes():
    ds = load_model("deepseek-v3")
    assert (ds.expert_groups, ds.groups_per_token) == (8, 4)
    free = dataclasses.replace(ds, expert_groups=1, groups_per_token=1)
    # 8 domains, one group each: at most 4 domains a token, 3.2 of them remote; unlimited, 4.6
    assert remote_domains_per_token(ds, 8) == pytest.approx(3.175, abs=5e-4)
    assert remote_domains_per_token(free, 8) == pytest.approx(4.633, abs=5e-4)
    assert remote_domains_per_token(ds, 1) == 0.0


def test_routing_groups_from_a_deepseek_config_and_their_checks(tmp_path):
    cfg = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=100,
               n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, n_group=4, topk_group=2)
    m = HFConfig.from_dict(cfg, "cfg").model_spec("toy", "")
    assert (m.expert_groups, m.groups_per_token) == (4, 2)
    assert "expert_groups" in m.to_dict() and "expert_groups" not in load_model("qwen3-30b-a3b").to_dict()
    with pytest.raises(SpecError, match="top_k .* cannot exceed groups_per_token x experts / expert_groups"):
        _toy(16, 5, 4, 1)
    with pytest.raises(SpecError, match="experts \\(16\\) must be a multiple of expert_groups \\(3\\)"):
        _toy(16, 2, 3, 1)
    with pytest.raises(SpecError, match="groups_per_token \\(2\\) needs expert_groups > 1"):
        _toy(16, 2, 1, 2)


def test_flex_dispatch_crosses_the_network_once_per_remote_node():
    ds, p = load_model("deepseek-v3"), _PROFILE
    nccl = ExpertLayout(tp=2, ep=64, etp=1, inter_node=True, domains=8)
    flex = dataclasses.replace(nccl, dispatcher="flex")
    copies = float(dispatch_bytes(S, ds, nccl, 2))  # the rank's S/tp tokens' k copies of h, bf16
    nic = copies / ds.top_k * remote_domains_per_token(ds, 8)
    want = 2 * max(float(p.collective_time_s("send_recv", nic, 2, "inter")),
                   float(p.collective_time_s("all_to_all", copies, 8, "intra")))
    assert float(moe_comm_fwd_s(p, S, ds, flex, 2)) == pytest.approx(want, rel=1e-12)
    assert float(moe_comm_fwd_s(p, S, ds, flex, 2)) < 0.6 * float(moe_comm_fwd_s(p, S, ds, nccl, 2))
    # inside one node DeepEP's NVLink kernels are priced as the NCCL all-to-all
    intra = ExpertLayout(tp=1, ep=8, etp=1)
    assert float(moe_comm_fwd_s(p, S, ds, dataclasses.replace(intra, dispatcher="flex"), 2)) == \
        float(moe_comm_fwd_s(p, S, ds, intra, 2))


def _qwen(**training) -> CostModel:
    tr = TrainingSpec(**{"tp": 1, "pp": 2, "ep": 8, "etp": 1, "moe_grouped_gemm": True, **training})
    return CostModel(Setup(load_model("qwen3-30b-a3b"), load_cluster("dgx-h100").with_gpus(16), tr), _PROFILE)


def test_ep_overlap_prices_the_four_steps_of_a_paired_layer():
    base, over = _qwen(), _qwen(ep_comm_overlap=True)
    u0, u1 = base.unit_cost([8192]), over.unit_cost([8192])
    assert u1.fwd_compute_s == pytest.approx(u0.fwd_compute_s) and u1.bwd_compute_s == pytest.approx(u0.bwd_compute_s)
    l, tokens = over.layers_per_stage, 8192.0
    a = float(over._lookup("moe_comm", tokens)) / 2
    x = float(over._lookup("gemm_experts", tokens))
    f, b = u0.fwd_compute_s / l, u0.bwd_compute_s / l
    slow = 1 - DEEPEP_SMS / 132

    def step(c, g):
        return max(c, g + c * (1 - slow))

    exposed = step(a, f - x) + step(a, x) + step(a, 2 * x) + step(a, b - 2 * x) - (f + b)
    assert 0 < exposed < 4 * a
    # each direction: the unoverlapped two all-to-alls give way to half the pair's exposed time
    assert u1.tp_comm_fwd_s == pytest.approx(u0.tp_comm_fwd_s - l * (2 * a - exposed / 2), rel=1e-9)
    assert u1.tp_comm_bwd_s == pytest.approx(u0.tp_comm_bwd_s - l * (2 * a - exposed / 2), rel=1e-9)


def test_ep_overlap_where_the_all_to_alls_dwarf_compute_takes_four_of_them():
    cm = _qwen(ep_comm_overlap=True)
    tokens = np.array([64.0])
    slow = cm._lookup("moe_comm", tokens) * 1e3  # an all-to-all far longer than any step's compute
    fwd = bwd = np.array([1e-4])
    cm._log_curves["moe_comm"] = (cm._log_curves["moe_comm"][0], cm._log_curves["moe_comm"][1] + np.log(1e3))
    hidden = cm.ep_overlap_hidden_s(tokens, fwd, bwd)
    a = slow / 2
    # four all-to-alls in a row, the compute under them: what is hidden each way is half of that compute's worth
    # (compute slowed by the SMs the transfers hold never outlasts them)
    assert float(hidden[0]) == pytest.approx(float((2 * a - (4 * a - (fwd + bwd)) / 2)[0]), rel=1e-9)


def test_ep_overlap_and_flex_refusals_and_cli():
    with pytest.raises(SpecError, match="ep_comm_overlap needs ep > 1"):
        TrainingSpec(ep_comm_overlap=True)
    with pytest.raises(SpecError, match="other than full"):
        TrainingSpec(tp=2, ep=2, ep_comm_overlap=True, recompute="full")
    with pytest.raises(SpecError, match="not fp32"):
        TrainingSpec(tp=2, ep=2, ep_comm_overlap=True, dtype="fp32")
    with pytest.raises(SpecError, match="at most one MTP depth"):
        TrainingSpec(tp=2, ep=2, ep_comm_overlap=True, mtp_layers=2)
    with pytest.raises(SpecError, match="no moe in recompute_modules"):  # the whole MoE layer (Megatron-LM #3916)
        TrainingSpec(tp=2, ep=2, ep_comm_overlap=True, recompute="selective", recompute_modules=("moe",))
    # its other modules run inside the overlap's nodes (fine_grained_callables): accepted
    TrainingSpec(tp=2, ep=2, ep_comm_overlap=True, recompute="selective", recompute_modules=("mlp", "moe_act"),
                 moe_grouped_gemm=True)
    with pytest.raises(SpecError, match="moe_dispatcher flex sends tokens .* needs ep > 1"):
        TrainingSpec(moe_dispatcher="flex")
    tr = TrainingSpec(tp=2, ep=2, moe_dispatcher="flex", ep_comm_overlap=True)
    assert tr.to_dict()["moe_dispatcher"] == "flex" and "moe_dispatcher" not in TrainingSpec().to_dict()
    assert TrainingSpec.from_dict(tr.to_dict()) == tr


def test_a_plan_records_and_reprices_its_dispatcher_and_overlap(tmp_path):
    from typer.testing import CliRunner

    from cli import app
    from planner.api import cost_model_for_plan
    from planner.plan import Plan

    args = ["plan", "--model", "qwen3-30b-a3b", "--gpus", "16", "--tp", "8", "--ep", "8", "--moe-grouped-gemm",
            "--max-context", "16K", "--strategy", "hdp"]
    r = CliRunner().invoke(app, [*args, "--moe-dispatcher", "flex", "--ep-comm-overlap", "--optimizer-moments",
                                 "bf16", "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert "ep=8 cf=1 flex ep-overlap" in r.output and "zero=1 (bf16 moments)" in r.output
    plan = Plan.from_dict(json.loads((tmp_path / "p.json").read_text()))
    cm = cost_model_for_plan(plan)
    assert cm.experts.dispatcher == "flex" and cm.setup.training.ep_comm_overlap
    assert cm.setup.training.optimizer_moments == "bf16"  # the plan's meta keeps it; the re-priced budget has it
    assert cm.budget.ctx_bytes > cm.setup.training.ctx_overhead_bytes  # DeepEP's buffers beside the context
    r = CliRunner().invoke(app, [*args, "--moe-dispatcher", "deepep"])
    assert r.exit_code == 2 and "--moe-dispatcher must be alltoall, flex or hybridep" in r.stderr
    r = CliRunner().invoke(app, [*args, "--optimizer-moments", "fp8"])
    assert r.exit_code == 2 and "--optimizer-moments must be fp32 or bf16" in r.stderr


def test_auto_recompute_keeps_to_what_the_overlap_allows():
    from planner.api import PlanRequest, resolve_setup

    req = dict(model="qwen3-30b-a3b", gpus=16, tp=8, ep=8, moe_grouped_gemm=True, max_context_tokens=512 * 1024)
    assert resolve_setup(PlanRequest(**req)).training.recompute == "full"  # what auto needs without the overlap
    setup = resolve_setup(PlanRequest(**req, ep_comm_overlap=True))
    assert setup.training.recompute == "selective" and setup.training.ep_comm_overlap


def test_the_overlap_holds_one_micro_batch_more_and_bounds_stay_bounds():
    from costmodel.memory import layers_held
    from planner.simulate.bounds import total_compute_s

    base, over = _qwen(pp=1), _qwen(pp=1, ep_comm_overlap=True)
    assert layers_held(over.setup) == 2 * layers_held(base.setup)  # pp = 1: a forward beside another's backward
    assert over.capacity_tokens < base.capacity_tokens
    assert layers_held(_qwen(pp=2, ep_comm_overlap=True).setup) == 3 * _qwen(pp=2).setup.layers_per_stage
    docs = np.full(max(1, over.capacity_tokens // 1024), 1024)
    unit = over.unit_cost(docs)
    assert total_compute_s(docs, over) <= unit.fwd_s + unit.bwd_s
    assert float(over.ep_overlap_max_hidden_s(4096.0)) == pytest.approx(float(over._lookup("moe_comm", 4096.0)))
    assert float(base.ep_overlap_max_hidden_s(4096.0)) == 0.0


def test_deepep_buffers_by_hand_and_in_the_memory_budget():
    """DeepEP's normal-mode buffers at 20 SMs (10 channels), each token slot 2h + 8 + 128 · (8 + 4 + 4) B: EP 8, one
    node, an NVLink ring of 256 tokens per channel and peer; EP 64 (8 nodes) 288 tokens and an RDMA ring of 140 (128
    rounded up to the send chunk of 28), send and receive halves; a 32 MiB workspace beside. They count as context
    (outside PyTorch's allocator) under the flex dispatcher only; group sizes DeepEP has no config for are refused."""
    from costmodel.memory import context_bytes, memory_budget
    from costmodel.moe import deepep_buffer_bytes

    slot = 2 * 7168 + 8 + 128 * 16
    nvl8 = 10 * 8 * (5 * 4 + 256 * slot)
    assert deepep_buffer_bytes(7168, 8) == -(-nvl8 // 128) * 128 + 32 * 2**20
    nvl64 = 10 * 8 * (19 * 4 + 288 * slot)
    rdma64 = 10 * 8 * (18 * 2 * 4 + 140 * 2 * (slot + 16))
    assert deepep_buffer_bytes(7168, 64) == -(-nvl64 // 128) * 128 + -(-rdma64 // 128) * 128 + 32 * 2**20
    assert deepep_buffer_bytes(7168, 64) / 2**20 == pytest.approx(742.7, abs=0.1)
    with pytest.raises(SpecError, match="DeepEP has no configuration for 12 EP ranks"):
        deepep_buffer_bytes(7168, 12)
    m, c = load_model("deepseek-v3"), load_cluster("dgx-h100").with_gpus(1024)
    setup = lambda d: Setup(m, c, TrainingSpec(tp=8, ep=8, pp=16, moe_dispatcher=d))  # noqa: E731
    assert context_bytes(setup("flex")) - context_bytes(setup("alltoall")) == deepep_buffer_bytes(7168, 8)
    # the dispatcher's group is Megatron-core's tp_ep_group: ep 2 folded into tp 8 still gives DeepEP 8 ranks
    ep2 = Setup(m, c, TrainingSpec(tp=8, ep=2, pp=16, moe_dispatcher="flex"))
    assert context_bytes(ep2) - context_bytes(setup("alltoall")) == deepep_buffer_bytes(7168, 8)
    assert memory_budget(setup("flex")).ctx_bytes == context_bytes(setup("flex"))
    assert memory_budget(setup("flex")).capacity_tokens < memory_budget(setup("alltoall")).capacity_tokens


def test_hybridep_buffers_per_token_sms_and_path():
    """HybridEP: receive buffers for every token of the EP group landing on one rank (2h + 4 B per expert of the
    node + 4 B per 128 elements a slot, ep slots a token) and across nodes the RDMA staging; they count per token of
    C (each TP rank dispatches s/tp tokens), so C shrinks and the budget's context holds them at C. Its transfers go
    as DeepEP's; the overlap's compute keeps more of the GPU (8 SMs across nodes, against DeepEP's 20)."""
    from costmodel.memory import context_bytes, dispatch_buffer_bytes_per_token, memory_budget
    from costmodel.moe import dispatcher_sms, hybridep_bytes_per_token

    slot = 2 * 7168 + 4 * 4 * 8 + 4 * 56  # DeepSeek-V3 at EP 64: 4 local experts, 8 ranks a node
    want = 64 * slot + 2 * 7168 + 7 * slot + 2 * 7 * 2 * 7168
    assert hybridep_bytes_per_token(7168, 64, 4, 8) == want and want * 4096 / 1e9 == pytest.approx(5.15, abs=0.01)
    assert hybridep_bytes_per_token(7168, 8, 32, 8) == 8 * (2 * 7168 + 4 * 32 * 8 + 4 * 56)  # one node: no RDMA
    assert (dispatcher_sms("hybridep", True), dispatcher_sms("hybridep", False), dispatcher_sms("flex", True)) == \
        (8, 32, DEEPEP_SMS)
    m, c = load_model("deepseek-v3"), load_cluster("dgx-h100").with_gpus(1024)
    setup = lambda d: Setup(m, c, TrainingSpec(tp=8, ep=8, pp=16, moe_dispatcher=d))  # noqa: E731
    per = dispatch_buffer_bytes_per_token(setup("hybridep"))
    assert per == hybridep_bytes_per_token(7168, 8, 32, 8) / 8 and dispatch_buffer_bytes_per_token(setup("flex")) == 0
    hyb, a2a = memory_budget(setup("hybridep")), memory_budget(setup("alltoall"))
    assert hyb.capacity_tokens < a2a.capacity_tokens
    assert hyb.ctx_bytes == pytest.approx(context_bytes(setup("alltoall")) + per * hyb.capacity_tokens)
    lay = ExpertLayout(tp=2, ep=64, etp=1, inter_node=True, domains=8)
    ds = load_model("deepseek-v3")
    assert float(moe_comm_fwd_s(_PROFILE, S, ds, dataclasses.replace(lay, dispatcher="hybridep"), 2)) == \
        float(moe_comm_fwd_s(_PROFILE, S, ds, dataclasses.replace(lay, dispatcher="flex"), 2))
    with pytest.raises(SpecError, match="moe_dispatcher hybridep sends tokens .* needs ep > 1"):
        TrainingSpec(moe_dispatcher="hybridep")

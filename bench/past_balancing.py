"""Past balancing (issue 20, item 2): what the ideas of newer systems (REFERENCE §13) could still buy over hdp,
on the cost model, for held-apart mixes. Prints a markdown table (docs/REPRODUCTION.md "Past balancing").

hdp is within a few % of its lower bound without PP, so an idea pays only if it lowers what that bound assumes,
or removes what the bound leaves out (with PP: the fill and drain). Per case:

- work bound: the bound's work term alone (every token and document at its best rate, perfectly balanced, plus
  the gradient sync), i.e. the bound without the longest sequence's critical path. FCP (fixed blocks placed on
  any rank) and separate attention / linear layouts (Zeppelin) balance at most this well: hdp / work - 1 is the
  most either can gain, before their own traffic.
- re-layout traffic: the all-to-alls separate layouts add (hidden states of every token into and out of the
  attention layout, forward and backward, over all HDP ranks), per step, if none of it hides.
- FCP block traffic: K/V of every 4K block sent to the ranks computing its later blocks (causal pairs), per rank
  and step at the inter-node P2P rate, if none of it hides.
- equal-time bins (DistCA: micro-batches balance only when both Σl and Σl² match): hdp with PP, with and
  without `HdpOptions.balanced_bins`, simulated.

    python -m bench.past_balancing
"""

from __future__ import annotations

import platform
from dataclasses import replace
from datetime import date

import numpy as np

from costmodel.timing import CostModel
from planner.api import PlanRequest, build_cost_model, make_batches
from planner.simulate import total_compute_s
from planner.strategies import STRATEGIES

M = 2**20
K = 1024
FCP_BLOCK_TOKENS = 4096  # FCP's block (REFERENCE §13: efficiency drops below 2K-token blocks)


def relayout_s(tokens: int, cm: CostModel) -> float:
    """All-to-alls of the hidden states into and out of the attention layout, forward and backward, every layer
    of a stage: 4 per layer, each moving a rank's share of tokens x h (bf16, over TP) between all HDP ranks."""
    hdp = cm.setup.hdp
    per_rank_bytes = tokens / hdp * cm.model.hidden * cm.bytes_per_elem / cm.tp
    scope = "inter" if cm.setup.mesh.group_spans_domains(hdp) else "intra"
    one = float(cm.profile.collective_time_s("all_to_all", per_rank_bytes, hdp, scope))
    return 4 * cm.layers_per_stage * one


def fcp_kv_s(lengths: np.ndarray, cm: CostModel) -> float:
    """K/V bytes each block sends to the blocks after it in its document (causal), spread over the HDP ranks,
    forward (K/V) and backward (dK/dV, fp32), per rank and step at the inter-node P2P rate: every layer of a stage."""
    n = np.ceil(np.asarray(lengths, dtype=float) / FCP_BLOCK_TOKENS)
    pairs = float((n * (n - 1) / 2).sum())  # (earlier block, later block) pairs that may sit on two ranks
    kv_block = FCP_BLOCK_TOKENS * 2 * cm.model.kv_width / cm.tp * cm.bytes_per_elem
    per_rank = pairs * kv_block * (1 + 2) / cm.setup.hdp  # K/V forward, dK/dV (fp32: 2x) backward
    return cm.layers_per_stage * float(cm.p2p_s(per_rank, True))


def dp_row(lengths: str) -> str:
    req = PlanRequest(model="llama-7b", gpus=1024, lengths=lengths, tokens_per_step=32 * M, max_context_tokens=2 * M)
    cm = build_cost_model(req)
    b = make_batches(req, cm)[0]
    st = STRATEGIES["hdp"](b, cm, req.options).predicted
    work = total_compute_s(b.lengths_tokens, cm) / (cm.setup.hdp * cm.pp) + cm.step_end_s(cm.setup.hdp)
    return (f"| {lengths}, LLaMA-7B, 1,024 GPUs, pp 1 | {st.step_time_s:.2f} | {st.lower_bound_s:.2f} | {work:.2f} | "
            f"{st.step_time_s / work - 1:+.1%} | {relayout_s(b.total_tokens, cm):.2f} | "
            f"{fcp_kv_s(b.lengths_tokens, cm):.2f} | - |")


def pp_row(lengths: str, pp: int, ctx: int) -> str:
    req = PlanRequest(model="llama3-70b", gpus=1024, tp=8, pp=pp, lengths=lengths, tokens_per_step=32 * M,
                      max_context_tokens=ctx)
    cm = build_cost_model(req)
    b = make_batches(req, cm)[0]
    on = STRATEGIES["hdp"](b, cm, req.options).predicted
    off_opt = replace(req.options, hdp=replace(req.options.hdp, balanced_bins=False))
    off = STRATEGIES["hdp"](b, cm, off_opt).predicted
    work = total_compute_s(b.lengths_tokens, cm) / (cm.setup.hdp * cm.pp) + cm.step_end_s(cm.setup.hdp)
    return (f"| {lengths}, LLaMA-3-70B tp 8 pp {pp}, {ctx // K}K | {off.step_time_s:.2f} | {on.lower_bound_s:.2f} | "
            f"{work:.2f} | {off.step_time_s / work - 1:+.1%} | {relayout_s(b.total_tokens, cm):.2f} | "
            f"{fcp_kv_s(b.lengths_tokens, cm):.2f} | {off.step_time_s:.2f} -> {on.step_time_s:.2f} "
            f"({on.step_time_s / off.step_time_s - 1:+.1%}) |")


def main() -> None:
    print(f"meshplan past-balancing evaluation, {date.today()}, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}; dgx-h100 (analytic), 32M tokens/step, seed 0\n")
    print("| case | hdp (s) | lower bound (s) | work bound (s) | hdp over work | re-layout a2a (s) | FCP K/V (s) | "
          "equal-time bins: hdp (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for lengths in ("github-like", "prolong-like", "longalign-like"):
        print(dp_row(lengths), flush=True)
    for lengths, pp, ctx in (("github-like", 4, 512 * K), ("prolong-like", 8, 512 * K), ("prolong-like", 4, 2 * M)):
        print(pp_row(lengths, pp, ctx), flush=True)


if __name__ == "__main__":
    main()

"""Pipeline benchmark (issue 7): closed-form bubbles vs the event simulator (1F1B, interleaved, sliced,
sliced and interleaved), the imbalance of uniform token slices and what mirror-pairing redistribution
removes (with its transfers priced), and stage-0 memory, step time and MFU per schedule for Llama-70B at
256K-2M on 256 GPUs (the SlimPipe setting). Prints markdown.

    python -m bench.pipeline
"""

from __future__ import annotations

import platform
from datetime import date
from functools import cache

from costmodel.flops import model_flops
from costmodel.timing import CostModel
from planner.api import PlanRequest, build_cost_model
from planner.schedule import closed_form_bubble, group_size, simulate_uniform
from planner.plan import Piece, PipelineSection, Predicted, Sequence, Step, Unit, zigzag_tokens_per_rank
from planner.simulate import StepSimulation, simulate_step, static_memory_bytes
from planner.simulate.memory import recompute_working_bytes

K = 1024
GIB = 2**30
M_SEQS = 8  # sequences per step in the Llama-70B setting (SlimPipe: GBS 8)


def bubbles() -> None:
    print("\n### Bubble fraction: simulator vs closed form (uniform work, backward = 2 x forward)\n")
    print("| schedule | p | m | n | v | closed form | simulated | sim / closed |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [("1F1B", 8, 16, 1, 1), ("interleaved", 8, 8, 1, 5), ("interleaved", 4, 16, 1, 10),
            ("sliced (balanced)", 8, 16, 16, 1), ("SlimPipe n x v", 8, 16, 16, 5),
            ("Llama-13B 1F1B", 8, 4, 1, 1), ("Llama-13B interleaved", 8, 4, 1, 2),
            ("Llama-13B interleaved", 8, 4, 1, 5),
            ("Llama-13B sliced", 8, 4, 16, 1), ("Llama-13B SlimPipe", 8, 4, 16, 5), ("Llama-13B SlimPipe", 8, 4, 32, 5),
            ("2048K SlimPipe", 16, 8, 32, 5), ("2048K SlimPipe", 16, 8, 64, 5)]
    for name, p, m, n, v in rows:
        _, b = simulate_uniform(p, m, n, v)
        cf = closed_form_bubble(p, m, n, v)
        print(f"| {name} | {p} | {m} | {n} | {v} | {cf:.4f} | {b:.4f} | {b / cf:.3f} |")
    print("\nInterleaving with m < p micro-batches (Llama-13B v = 2, 5 at m = 4, p = 8) cannot fill Megatron's\n"
          "groups of p: chunk c + 1 on stage 0 waits for chunk c to leave the last stage, so the simulator\n"
          f"exceeds the closed form there. Slices fill the groups instead (group = smallest divisor of n >= p:\n"
          f"{group_size(16, 8)} for n = 16, p = 8).")


def imbalance() -> None:
    print("\n### Uniform token slices: imbalance and mirror pairing (p = 8, m = 4, attention-bound)\n")
    print("| n | v | uniform slices | mirror pairing (rendezvous: the planner's model) | same moves, free-running "
          "| pairing, <= 2 chunks per pair | evened slices (closed form) |")
    print("|---|---|---|---|---|---|---|")
    p, m = 8, 4
    for n, v in ((16, 1), (32, 1), (16, 5), (32, 5)):
        uneven = simulate_uniform(p, m, n, v, attn_share=1.0)[1]
        cf = closed_form_bubble(p, m, n, v)
        if v == 1:  # SlimPipe's pairing needs its own warm-up (see below): the planner does not pair here
            print(f"| {n} | {v} | {uneven:.4f} | (not paired) | | | {cf:.4f} |")
            continue
        paired = simulate_uniform(p, m, n, v, attn_share=1.0, redistribute=True, rendezvous=True)[1]
        free = simulate_uniform(p, m, n, v, attn_share=1.0, redistribute=True)[1]
        clipped = simulate_uniform(p, m, n, v, attn_share=1.0, redistribute=True, max_chunks=2, rendezvous=True)[1]
        print(f"| {n} | {v} | {uneven:.4f} | {paired:.4f} | {free:.4f} | {clipped:.4f} | {cf:.4f} |")
    print("\nSlice j's attention is (2j + 1)/n of the mean (REFERENCE §6). Mirror pairing (free transfers here)\n"
          "pairs the ops of a schedule step (SlimPipe's offsets: stage r at forward position t - r, backward\n"
          "t - (p - 1 - r)) by attention and moves whole K/V chunks from the heavy op to its partner; it is off\n"
          "where some stage has no op of that step (fill and drain). Partners exchange tensors mid-op, so they\n"
          "start together (a rendezvous in the event engine); free-running lets each op take its new duration\n"
          "whenever its stage reaches it, which spreads the leftovers over time and is optimistic. What keeps\n"
          "the rendezvous above the closed form: unpaired fill/drain steps, unequal pair sums where a step's\n"
          "slices wrap across a micro-batch or group boundary, and whole-chunk rounding (half a chunk stays\n"
          "when the slice gap is odd). With v = 1 the lists keep Seq1F1B's warm-up (n + p - r - 2 slices), under\n"
          "which the ops a step pairs belong to different iterations; SlimPipe aligns them with a warm-up of\n"
          "n + 2(p - r - 1), i.e. more memory. Paired as rendezvous they stall the pipeline (slower than no\n"
          "pairing), so the planner pairs only interleaved (v > 1) sliced schedules.")


def cp_step(cm: CostModel, s: int, m: int, slices: int, v: int, schedule: str) -> Step:
    """m micro-batches of one s-token sequence, each sharded over every HDP rank (CP = hdp)."""
    hdp = cm.setup.hdp
    units = [Unit(id=i, hdp_ranks=tuple(range(hdp)), pieces=(Piece(i, 0, s),), slices=slices,
                  tokens_per_rank=zigzag_tokens_per_rank([s], hdp)) for i in range(m)]
    return Step(step=0, global_tokens=s * m, sequences=[Sequence(i, s) for i in range(m)], units=units,
                order={r: list(range(m)) for r in range(hdp)}, predicted=Predicted(0.0, 0.0, [0.0] * hdp, [0.0] * hdp),
                pipeline=PipelineSection(schedule, v))


@cache
def llama70b(s: int) -> CostModel:
    # SlimPipe's 2048K configuration: TP4 CP4 PP16 on 256 GPUs (REFERENCE §6); here CP4 = 4 HDP ranks.
    return build_cost_model(PlanRequest(model="llama-70b", gpus=256, tp=4, pp=16, recompute="full",
                                        max_context_tokens=s))


@cache
def run(s: int, n: int, v: int, schedule: str) -> StepSimulation:
    cm = llama70b(s)
    return simulate_step(cp_step(cm, s, M_SEQS, n, v, schedule), cm)


def planned(s: int, n: int, v: int) -> StepSimulation:
    """The schedule the planner would keep: sliced units with mirror pairing only where it is faster."""
    if n == 1:
        return run(s, n, v, "interleaved" if v > 1 else "1f1b")
    return min((run(s, n, v, "sliced"), run(s, n, v, "sliced-redistributed")), key=lambda x: x.step_time_s)


def memory_formula_bytes(cm: CostModel, s: int, n: int, v: int) -> float:
    """Stage-0 resident activations by closed form: in-flight units × their bytes, plus fp32 dK/dV of the
    whole sequence (all v chunks' when a micro-batch spans several slice groups, else one chunk's), plus under
    full recompute the one layer of a slice that a backward rebuilds."""
    p, m, L = cm.pp, M_SEQS, cm.model.layers
    tok = zigzag_tokens_per_rank([s], cm.setup.hdp)
    if n == 1 and v == 1:
        inflight = min(p, m)  # 1F1B: micro-batches
    elif n == 1:
        inflight = min(2 * (p - 1) + (v - 1) * p + 1, m * v)  # Megatron: chunk-forwards
    elif v == 1:
        inflight = min(n + p - 1, m * n)  # Seq1F1B: slices
    else:
        inflight = min(n * v + 2 * (p - 1), m * n * v)  # SlimPipe: slice-chunks
    act = inflight * tok / (n * v) * (L / p) * cm.a_tok
    dkv = 0.0
    if n > 1:
        dkv = tok * 2 * cm.model.kv_width / cm.tp * 4 * cm.layers_per_stage
        dkv /= v if n == group_size(n, p) else 1
    return act + dkv + recompute_working_bytes(tok / n, cm)


def memory_and_mfu() -> None:
    print(f"\n### Llama-70B on 256 x H100 (analytic): TP4, PP16, 4 HDP ranks (CP 4), {M_SEQS} sequences per step\n")
    print("| context | schedule | n | v | stage-0 act. + dK/dV (GiB) | closed form (GiB) | "
          "SlimPipe s·L·a/p·(1+2(p-1)/(nv)) (GiB) | peak incl. states (GiB) | step (s) | bubble | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in (256 * K, 512 * K, 1024 * K, 2048 * K):
        cm = llama70b(s)
        p, L = cm.pp, cm.model.layers
        tok = zigzag_tokens_per_rank([s], cm.setup.hdp)
        for name, n, v in (("1F1B", 1, 1), ("interleaved", 1, 5), ("sliced", 32, 1), ("sliced", 64, 1),
                           ("SlimPipe", 32, 5), ("SlimPipe", 64, 5)):
            sim = planned(s, n, v)
            peak = sim.peak_memory_bytes[0]
            act = peak - static_memory_bytes(cm, None)
            slim = f"{tok * L * cm.a_tok / p * (1 + 2 * (p - 1) / (n * v)) / GIB:.1f}" if n > 1 else "-"
            available_flop = sim.step_time_s * cm.setup.cluster.world_size * cm.peak_flops()
            mfu = model_flops([s] * M_SEQS, cm.model) / available_flop
            formula = memory_formula_bytes(cm, s, n, v)
            print(f"| {s // K}K | {name} | {n} | {v} | {act / GIB:.1f} | {formula / GIB:.1f} | "
                  f"{slim} | {peak / GIB:.1f} | {sim.step_time_s:.1f} | "
                  f"{sim.breakdown['bubble'] / sim.step_time_s:.3f} | {mfu:.1%} |")
    print("\nclosed form: stage 0 holds min(p, m) micro-batches (1F1B), min(2(p-1) + (v-1)p + 1, m·v) chunks\n"
          "(interleaved), min(n + p - 1, m·n) slices (sliced, Seq1F1B) or min(n·v + 2(p-1), m·n·v) slice-chunks\n"
          "(SlimPipe), each of s/n tokens per CP rank × L/(p·v) layers × a bytes, plus fp32 dK/dV of the sequence\n"
          "for the stage's layers (one chunk's when a micro-batch is a single slice group), plus under full\n"
          "recompute (these runs) the one layer of s/n tokens a backward rebuilds. The SlimPipe column\n"
          "is REFERENCE §6's form without dK/dV. Sliced rows keep mirror pairing (its transfers priced) where it\n"
          "is faster, as the planner does.\n"
          "MFU: causal attention halved, recompute excluded, 989 TFLOP/s peak.")


def redistribution() -> None:
    print("\n### Llama-70B: uniform slices vs mirror pairing with its transfers (same setting)\n")
    print("| context | n | v | step, uniform slices (s) | bubble | step, mirror pairing (s) | bubble | "
          "exposed exchange (s/rank) | closed-form bubble |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in (256 * K, 512 * K, 2048 * K):
        for n, v in ((32, 2), (64, 2), (32, 5), (64, 5)):  # v = 1 is not paired (see above)
            plain = run(s, n, v, "sliced")
            paired = run(s, n, v, "sliced-redistributed")
            print(f"| {s // K}K | {n} | {v} | {plain.step_time_s:.1f} | "
                  f"{plain.breakdown['bubble'] / plain.step_time_s:.3f} | "
                  f"{paired.step_time_s:.1f} | {paired.breakdown['bubble'] / paired.step_time_s:.3f} | "
                  f"{paired.breakdown['pp_exchange']:.3f} | {closed_form_bubble(16, M_SEQS, n, v):.4f} |")
    cm = llama70b(256 * K)
    print(f"\nThe exchange moves Q + k K/V chunks (forward) or dO, Q, O, lse + k chunks (backward) per layer to the\n"
          f"light partner and O + lse (forward) or dQ + k chunks' dK/dV (backward) back, on the PP link between the\n"
          f"two stages (here inter-node: a stage fills {cm.setup.hdp * cm.tp} GPUs); a pair moves only when that\n"
          "shortens its longer op. Exposed exchange: seconds per rank the transfers add beyond the attention\n"
          "that hides them.")


def main() -> None:
    print(f"meshplan pipeline benchmark, {date.today()}, {platform.machine()}, python {platform.python_version()}")
    bubbles()
    imbalance()
    memory_and_mfu()
    redistribution()


if __name__ == "__main__":
    main()

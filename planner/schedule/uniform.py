"""One pipeline of m identical micro-batches: the closed-form bubble of REFERENCE §6 and the same
pipeline run on the event engine (with or without mirror pairing), which the tests and
`bench.pipeline` compare."""

from __future__ import annotations

from planner.schedule.engine import run_ops
from planner.schedule.ops import OpKey, PipeOp, dependency, mirror_chunks, mirror_pairs, slice_share, stage_ops


def closed_form_bubble(p: int, m: int, n: int = 1, v: int = 1) -> float:
    """(p−1)/(m·n·v + p−1): 1F1B (n = v = 1), interleaved (v), balanced slicing (n) [REFERENCE §6]."""
    return (p - 1) / (m * n * v + p - 1)


def simulate_uniform(p: int, m: int, n: int = 1, v: int = 1, fwd_s: float = 1.0, bwd_s: float = 2.0,
                     attn_share: float = 0.0, redistribute: bool = False,
                     max_chunks: int = 10**9, rendezvous: bool = False) -> tuple[float, float]:
    """One pipeline of m identical single-sequence micro-batches: (step time, bubble fraction of stage
    0). Per-op times are the micro-batch's stage time ÷ v, times its slice's share (`slice_share`:
    uniform token slices of a sequence whose stage time is `attn_share` causal attention). redistribute: mirror pairing
    moves whole K/V chunks between paired ops at no transfer cost (the plan simulator prices them).
    rendezvous: paired ops start together (`run_ops` pairs), as SlimPipe's per-layer exchange forces;
    without it each op just takes its adjusted duration whenever its stage reaches it."""
    lists = {(0, s): [((s, op), op) for op in stage_ops(p, s, [n] * m, v)] for s in range(p)}
    extra: dict[OpKey, float] = {}
    moved_pairs: list[tuple[OpKey, OpKey]] = []

    def base(op: PipeOp) -> float:
        return (fwd_s if op.kind == "F" else bwd_s) / v

    if redistribute and n > 1 and attn_share > 0:
        def attn(_s: int, op: PipeOp) -> float:
            return base(op) * attn_share * (2 * op.slice + 1) / (n * n)

        stage_lists = [[op for _, op in lists[(0, s)]] for s in range(p)]
        for hi, lo in mirror_pairs(stage_lists, attn):
            k = mirror_chunks(attn(*hi), attn(*lo), base(hi[1]) * attn_share * 2 / (n * n), max_chunks)
            moved = k * base(hi[1]) * attn_share * 2 / (n * n)
            extra[hi] = extra.get(hi, 0.0) - moved
            extra[lo] = extra.get(lo, 0.0) + moved
            if k:
                moved_pairs.append((hi, lo))

    def solo(key: OpKey) -> float:
        return base(key[1]) * slice_share(key[1].slice, n, attn_share)

    def dur(key: OpKey) -> float:
        return solo(key) + extra.get(key, 0.0)

    runs = run_ops(lists, lambda key: dependency(key[1], key[0], p, v, n - 1), dur, lambda key: 0.0,
                   pairs=moved_pairs if rendezvous else (), solo=solo)
    total = max(r.end_s for r in runs)
    busy0 = sum(r.end_s - r.start_s for r in runs if (0, 0) in r.resources)
    return total, 1.0 - busy0 / total

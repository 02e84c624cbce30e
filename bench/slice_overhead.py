"""What running a unit as SlimPipe slices costs over running it whole, in one process: the replay's own model and
attention (planner/runtime: slice j's queries against the K/V cache of slices < j, the backward in reverse feeding the
accumulated dK/dV), forward and backward, timed in paired rounds (whole, then each slice count, in turn); beside it
the cost model's price of the sliced stage op over the whole one (planner/simulate/pipelined.py `sliced_pass_s`:
attention once, everything else once per slice at the slice's tokens).

    python -m bench.slice_overhead                              # tiny, one 2,899-token document, 2 and 4 slices
    python -m bench.slice_overhead --docs 4096 --slices 2 4 8 --profile local-cpu.measured

On a CPU each rank runs one torch thread and the time is the process's CPU time (other tenants' load moves wall
time); on a GPU wall time after a synchronize. Figures, never pass/fail."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

# bench/ holds scripts named like packages (bench/planner.py): import the real packages, not them.
sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != Path(__file__).resolve().parent]


def runner(model_name: str, docs: list[int], device: str):
    """(whole(), sliced(n)): one forward and backward of the unit, whole or as n slices, on one rank."""
    import torch

    from costmodel.presets import load_model
    from planner.plan import Piece, Sequence
    from planner.runtime.cp import KVCache, PackedAttention, Peers, SlicedAttention, shard_layout, slice_layout, \
        unit_documents
    from planner.runtime.inputs import unit_inputs
    from planner.runtime.model import ModelConfig, TokenSource, build_model
    from planner.runtime.step import token_loss

    dev = torch.device(device)
    spec = load_model(model_name)
    model = build_model(ModelConfig(spec, precision="bf16" if dev.type == "cuda" else "fp32"), seed=0, device=dev)
    seqs = [Sequence(i, n) for i, n in enumerate(docs)]
    tokens = TokenSource(spec.vocab, seed=0).tokens(0, seqs)
    pieces = unit_documents(tuple(Piece(i, 0, n) for i, n in enumerate(docs)))
    total = sum(docs)

    def inputs(lay):
        return [x.to(dev) for x in unit_inputs(tokens, lay)]

    def whole() -> None:
        lay = shard_layout(pieces, 1, 0)
        inp, lab, pos = inputs(lay)
        token_loss(model, model(inp, pos, PackedAttention(lay)), lab, total).backward()
        model.zero_grad(set_to_none=False)

    def sliced(n: int) -> None:
        cache, peers = KVCache(), Peers((0,), 0)
        layouts = [[slice_layout(pieces, n, j, 1, 0)] for j in range(n)]
        losses = []
        for j in range(n):
            inp, lab, pos = inputs(layouts[j][0])
            attn = SlicedAttention(layouts, j, peers, cache, dev)
            losses.append(token_loss(model, model(inp, pos, attn), lab, total))
        for j in reversed(range(n)):
            roots, grads = cache.backward_roots(j, range(spec.layers))
            torch.autograd.backward([losses[j], *roots], [None, *grads])
        model.zero_grad(set_to_none=False)

    return whole, sliced


def measure(model_name: str, docs: list[int], slices: list[int], rounds: int, device: str) -> dict[int, list[float]]:
    """Per slice count, each round's sliced time over that round's whole time (rounds after 2 warm-ups)."""
    import torch

    gpu = device == "cuda"
    if not gpu:
        torch.set_num_threads(1)  # as a CPU rank of the replay
    whole, sliced = runner(model_name, docs, device)

    def timed(fn) -> float:
        if gpu:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return time.perf_counter() - t0
        c0 = time.process_time()
        fn()
        return time.process_time() - c0

    ratios: dict[int, list[float]] = {n: [] for n in slices}
    for r in range(rounds + 2):
        base = timed(whole)
        for n in slices:
            x = timed(lambda: sliced(n)) / base
            if r >= 2:
                ratios[n].append(x)
    return ratios


def priced(model_name: str, docs: list[int], slices: list[int], profile: str) -> dict[int, float]:
    """The simulator's sliced stage op over the whole one, forward + backward (pp = 2, the first stage: no head), per
    slice count."""
    import numpy as np

    from costmodel.presets import load_cluster, load_model
    from costmodel.specs import Setup, TrainingSpec
    from costmodel.timing import CostModel
    from planner.simulate.pipelined import sliced_pass_s
    from profiles.table import load_profile

    prof = load_profile(profile)
    cpu = prof.fingerprint.device.startswith("cpu")
    cluster = load_cluster("local-cpu" if cpu else "hgx-h200").with_gpus(2)
    setup = Setup(load_model(model_name), cluster, TrainingSpec(dtype="fp32" if cpu else "bf16", kernels="eager",
                                                                 pp=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = CostModel(setup, prof, compute_share=1.0)  # one rank alone, as measured here

    def unit(n: int):
        lengths = np.array([-(-d // n) for d in docs], dtype=float)  # every document's n-th (slice_costs)
        return cm.price_units(lengths, np.array([0]), with_head=False).unit(0)

    whole = unit(1)
    out = {}
    for n in slices:
        one = unit(n)
        out[n] = sum(sliced_pass_s(whole, one, n, f) for f in (True, False)) / (whole.fwd_s + whole.bwd_s)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--docs", type=int, nargs="+", default=[2899], help="document lengths of the unit (tokens)")
    ap.add_argument("--slices", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when there is one")
    ap.add_argument("--profile", default=None, help="price on this profile (default: local-cpu.measured on a CPU, "
                                                    "h200-sxm.measured on a GPU)")
    a = ap.parse_args(argv)
    if any(n < 2 for n in a.slices) or any(d < max(a.slices) for d in a.docs):
        sys.exit("--slices: each at least 2 and at most the shortest document's length")
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: there is no CUDA device here")
    profile = a.profile or ("h200-sxm.measured" if device == "cuda" else "local-cpu.measured")
    got = measure(a.model, a.docs, a.slices, a.rounds, device)
    model_x = priced(a.model, a.docs, a.slices, profile)
    clock = "CPU time" if device == "cpu" else "wall time"
    print(f"{a.model}, documents {a.docs}, {device}; {clock} of forward + backward, sliced over whole, {a.rounds} "
          f"paired rounds; priced on {profile}\n")
    print("| slices | measured median | min | max | priced |")
    print("|---|---|---|---|---|")
    for n in a.slices:
        x = got[n]
        print(f"| {n} | {statistics.median(x):.3f} | {min(x):.3f} | {max(x):.3f} | {model_x[n]:.3f} |")


if __name__ == "__main__":
    main()

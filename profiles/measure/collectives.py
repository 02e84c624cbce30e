"""Collective table, measured by a torchrun worker (gloo on CPU, NCCL on GPU):

    python -m torch.distributed.run --standalone --nproc-per-node N -m profiles.measure.collectives \\
        --out rows.json [--quick] [--max-bytes N] [--ops all_reduce,send_recv] [--check]

HDP changes its communication groups every step, so everything runs on the WORLD group: no new
process groups (creating communicators mid-run costs seconds, REFERENCE 8.4). A group that is the
whole world uses the backend's native collective (impl "native"); a subset of ranks, and several
disjoint subsets at once (the contention case), use ring algorithms built from batched
isend/irecv on the world group (impl "p2p_ring"; all-to-all: "p2p_pairwise"). Concurrent groups are
interleaved (group j holds ranks j, j + c, ...) as the DP groups of a TP mesh are: across nodes they
share each node's NICs, which is what the cost model looks them up for. send/recv is
always a P2P ring: each member sends S bytes to the next member and receives S from the previous.

Per repeat: a barrier (untimed), then the op; each rank times its own call and the repeat's time
is the MAX over ranks (the slowest rank finishes the collective); the row holds the mean over
repeats: the expected time of a call, which a step that makes many calls pays. Gloo on a shared host has a heavy
tail (2 ranks, 4 KB: median 0.4 ms, 90th percentile 4 ms, mean 1.6 ms), which a median hides. S follows
nccl-tests (all-gather: output, reduce-scatter: input, all-to-all: per-rank send buffer); S is rounded down to
whole fp32 elements divisible by the group size. algbw = S/t and busbw = algbw·F(n) are stored beside the time
(REFERENCE 7.6). cpu_s: the process CPU (every thread: gloo's transfer threads with the caller) a member rank spends
per call, mean over repeats and members: on a host whose ranks share the cores, what a transfer takes from compute.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from profiles.measure import (OPS, CollectiveCase, MeasureConfig, collective_cases, collective_timing, plan_config,
                              time_op)
from profiles.table import TABLE_COLUMNS, atomic_write_text, bus_factor

COLUMNS = TABLE_COLUMNS["collective"] + ["impl", "algbw_bytes_per_s", "busbw_bytes_per_s", "cpu_s"]
PROGRESS_TAG = "@@meshplan-progress"  # rank 0 prints "<tag> done total" lines the runner parses
ELEM_BYTES = 4  # fp32 buffers: the byte count, not the dtype, sets a collective's time


class SubsetComm:
    """Collectives among an arbitrary ordered subset of world ranks, from P2P ops on the world group.
    Ring order is the order of `ranks`; each call blocks until its transfers complete."""

    def __init__(self, ranks: list[int], rank: int) -> None:
        self.ranks = ranks
        self.g = len(ranks)
        self.i = ranks.index(rank)
        self.next = ranks[(self.i + 1) % self.g]
        self.prev = ranks[(self.i - 1) % self.g]

    def _wait(self, ops: list[dist.P2POp]) -> None:
        for req in dist.batch_isend_irecv(ops):
            req.wait()

    def _step(self, send: torch.Tensor, recv: torch.Tensor) -> None:
        self._wait([dist.P2POp(dist.isend, send, self.next), dist.P2POp(dist.irecv, recv, self.prev)])

    def send_recv(self, buf: torch.Tensor, out: torch.Tensor) -> None:
        self._step(buf, out)

    def all_gather(self, out: torch.Tensor) -> None:
        """out holds g chunks; chunk i (this rank's) is the input. Ring: g-1 steps."""
        c = out.view(self.g, -1)
        for t in range(self.g - 1):
            self._step(c[(self.i - t) % self.g], c[(self.i - t - 1) % self.g])

    def reduce_scatter(self, buf: torch.Tensor, tmp: torch.Tensor) -> None:
        """buf holds g chunks, summed in place; afterwards chunk i holds the reduced chunk i."""
        c = buf.view(self.g, -1)
        for t in range(self.g - 1):
            self._step(c[(self.i - t - 1) % self.g], tmp)
            c[(self.i - t - 2) % self.g] += tmp

    def all_reduce(self, buf: torch.Tensor, tmp: torch.Tensor) -> None:
        self.reduce_scatter(buf, tmp)
        self.all_gather(buf)

    def all_to_all(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        """Chunk j of inp goes to member j; chunk j of out comes from member j. One batch of pairs."""
        a, b = inp.view(self.g, -1), out.view(self.g, -1)
        b[self.i].copy_(a[self.i])
        ops = []
        for j, r in enumerate(self.ranks):
            if j != self.i:
                ops += [dist.P2POp(dist.isend, a[j], r), dist.P2POp(dist.irecv, b[j], r)]
        self._wait(ops)


def _elems(case: CollectiveCase) -> int:
    per = case.nbytes // ELEM_BYTES
    return max(case.group_size, per // case.group_size * case.group_size)


def build_op(case: CollectiveCase, rank: int, world: int, device: torch.device):
    """(impl, fn or None when this rank idles, members of this rank's group or None, S in bytes)."""
    g, n = case.group_size, _elems(case)
    c = case.concurrent_groups
    groups = [list(range(j, g * c, c)) for j in range(c)]  # interleaved: the DP groups of a TP-c mesh
    mine = next((grp for grp in groups if rank in grp), None)
    native = g == world and case.op != "send_recv"
    impl = "native" if native else ("p2p_pairwise" if case.op == "all_to_all" else "p2p_ring")
    if mine is None:
        return impl, None, None, n * ELEM_BYTES
    buf = torch.ones(n, device=device)
    out = torch.empty(n // g if case.op == "reduce_scatter" else n, device=device)
    if native:
        fns = {"all_reduce": lambda: dist.all_reduce(buf),
               "all_gather": lambda: dist.all_gather_into_tensor(out, buf[: n // g]),
               "reduce_scatter": lambda: dist.reduce_scatter_tensor(out, buf),
               "all_to_all": lambda: dist.all_to_all_single(out, buf)}
        return impl, fns[case.op], mine, n * ELEM_BYTES
    comm = SubsetComm(mine, rank)
    tmp = torch.empty(n // g, device=device)
    fns = {"all_reduce": lambda: comm.all_reduce(buf, tmp),
           "all_gather": lambda: comm.all_gather(buf),
           "reduce_scatter": lambda: comm.reduce_scatter(buf, tmp),
           "all_to_all": lambda: comm.all_to_all(buf, out),
           "send_recv": lambda: comm.send_recv(buf, out)}
    return impl, fns[case.op], mine, n * ELEM_BYTES


def row_time_s(repeat_s: list[float]) -> float:
    """A row's time from its repeats' times (each the slowest rank's): their mean, the expected time of a call (the
    module docstring: a median would hide gloo's tail on a shared host)."""
    return float(statistics.fmean(repeat_s))


def run_case(case: CollectiveCase, cfg: MeasureConfig, rank: int, world: int, local_world: int,
             device: torch.device) -> tuple | None:
    """Time one case on all ranks; rank 0 gets the table row, the others None."""
    impl, fn, members, nbytes = build_op(case, rank, world, device)
    gpu = device.type == "cuda"

    def barrier() -> None:
        dist.barrier(device_ids=[device.index]) if gpu else dist.barrier()
        if gpu:
            torch.cuda.synchronize()

    cpu_s: list[float] = []  # each call's process CPU, warm-ups first

    def call(_) -> None:
        if fn:
            c0 = time.process_time()
            fn()
            cpu_s.append(time.process_time() - c0)

    samples = time_op(call, collective_timing(cfg, nbytes), device=device.type, setup=barrier, flush_l2=False)
    times = torch.tensor(samples, dtype=torch.float64, device=device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # a repeat lasts until its slowest rank is done
    timed = cpu_s[len(cpu_s) - len(samples):]
    cpu = torch.tensor([sum(timed), len(timed)] if fn else [0.0, 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(cpu)  # summed over the members: their mean per call
    if rank != 0:
        return None
    t = row_time_s(times.cpu().tolist())
    scope = "intra" if len({r // local_world for r in members}) == 1 else "inter"  # rank 0's group: group 0
    algbw = nbytes / t
    return (case.op, scope, case.group_size, case.concurrent_groups, nbytes, t, impl, algbw,
            algbw * bus_factor(case.op, case.group_size), float(cpu[0] / cpu[1]))


def check_algorithms(rank: int, world: int, device: torch.device) -> None:
    """Compare every P2P ring result with the value computed by hand, for the whole world and for
    the subset of the first world-1 ranks; raise on any mismatch."""
    for g in sorted({world, max(2, world - 1)}):
        members = list(range(g))
        if rank not in members:
            dist.barrier()
            continue
        comm = SubsetComm(members, rank)
        n = 4 * g
        ref = [torch.arange(n, dtype=torch.float32, device=device) + 100.0 * r for r in members]
        mine = ref[comm.i]
        total = sum(ref)
        buf, tmp = mine.clone(), torch.empty(n // g, device=device)
        comm.all_reduce(buf, tmp)
        got = {"all_reduce": (buf, total)}
        buf = mine.clone()
        comm.reduce_scatter(buf, tmp)
        got["reduce_scatter"] = (buf.view(g, -1)[comm.i], total.view(g, -1)[comm.i])
        out = torch.zeros(n, device=device)
        out.view(g, -1)[comm.i] = mine.view(g, -1)[comm.i]
        comm.all_gather(out)
        got["all_gather"] = (out, torch.cat([ref[j].view(g, -1)[j] for j in range(g)]))
        out = torch.empty(n, device=device)
        comm.all_to_all(mine, out)
        got["all_to_all"] = (out, torch.cat([ref[j].view(g, -1)[comm.i] for j in range(g)]))
        out = torch.empty(n, device=device)
        comm.send_recv(mine, out)
        got["send_recv"] = (out, ref[(comm.i - 1) % g])
        for op, (a, b) in got.items():
            if not torch.equal(a, b):
                raise RuntimeError(f"rank {rank}: P2P {op} on ranks {members} gave {a.tolist()}, "
                                   f"expected {b.tolist()}")
        dist.barrier()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m torch.distributed.run ... -m profiles.measure.collectives",
                                 description="Collective micro-benchmark worker (run under torchrun).")
    ap.add_argument("--out", required=True, help="JSON file rank 0 writes the rows to")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-bytes", type=int, default=None)
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    ap.add_argument("--check", action="store_true", help="verify the P2P algorithms first")
    args = ap.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    bad = [o for o in ops if o not in OPS]
    if bad:
        print(f"error: unknown collective op(s) {bad}; one of {', '.join(OPS)}", file=sys.stderr)
        return 2
    if "RANK" not in os.environ:
        print("error: run this worker under torchrun (python -m torch.distributed.run ...)", file=sys.stderr)
        return 2

    gpu = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if gpu else "gloo", timeout=timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    try:
        if args.check:
            check_algorithms(rank, world, device)
        cfg = plan_config("cuda" if gpu else "cpu", quick=args.quick, nproc=world, max_bytes=args.max_bytes)
        cases = [c for c in collective_cases(cfg, world) if c.op in ops]
        rows = []
        for i, case in enumerate(cases):
            row = run_case(case, cfg, rank, world, local_world, device)
            if rank == 0:
                rows.append(row)
                print(f"{PROGRESS_TAG} {i + 1} {len(cases)}", flush=True)
        if rank == 0:
            meta = {"backend": dist.get_backend(), "world": world, "local_world": local_world,
                    "sizes": list(cfg.coll_sizes), "group_sizes": list(cfg.coll_group_sizes)}
            atomic_write_text(Path(args.out), json.dumps({"columns": COLUMNS, "rows": rows, "meta": meta}) + "\n")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

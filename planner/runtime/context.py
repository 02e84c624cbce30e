"""Per-rank state of a replay (Context), the optimizer it steps, and how a rank names its failure."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from planner.runtime.collector import GcClock, process_clock
from planner.runtime.launch import PEER_STOPPED, Position, Prepared, ReplayFailure, ReplayOptions
from planner.runtime.model import Decoder, TokenSource
from planner.runtime.trace import TraceLog


@dataclass
class Context:
    """Per-rank state of a replay."""

    opts: ReplayOptions
    prep: Prepared
    rank: int
    hdp_rank: int
    device: torch.device
    model: Decoder
    optimizer: torch.optim.Optimizer
    tokens: TokenSource
    params: frozenset[int]  # parameter data pointers (never offloaded)
    trace: TraceLog  # this rank's records (appended to its trace part as they come)
    stage: int = 0  # pipeline stage of this rank
    layer_ranges: tuple[tuple[int, int], ...] = ()  # [start, end) per virtual stage (chunk·pp + stage)
    owned: tuple[nn.Parameter, ...] = ()  # parameters of this stage (all of them when pp = 1)
    stage_group: object = None  # process group of this stage's HDP ranks of our TP rank (None: the world)
    tp_rank: int = 0  # index in the TP group
    full: Decoder | None = None  # --check with pp or tp > 1: the whole model, filled from the shards' owners
    check_owned: frozenset[str] = frozenset()  # names of the parameters this rank fills `full` with
    position: Position = field(default_factory=lambda: Position(None, 0))  # where this rank is, for failures
    node_load: bool = False  # rank 0 of a one-node CPU run: read the node's CPU time around each step (other load)
    gc_clock: GcClock = field(default_factory=process_clock)  # the collector's time (planner/runtime/collector.py)


def make_optimizer(params: list[nn.Parameter], opts: ReplayOptions) -> torch.optim.Optimizer:
    # AdamW fused (CPU and CUDA): one multi-tensor kernel, Megatron's fused Adam that the cost model prices as one
    # memory-bound pass; the per-tensor loop took 4x as long for `tiny` on one core (0.80 against 0.18 ms).
    if opts.optimizer == "sgd":
        return torch.optim.SGD(params, lr=opts.lr, foreach=False)
    return torch.optim.AdamW(params, lr=opts.lr, fused=True)


def _peer_lost(e: Exception) -> bool:
    """A transport error caused by another rank dying (its own error names the root cause)."""
    text = str(e)
    return isinstance(e, dist.DistBackendError) or any(
        m in text for m in ("Connection closed by peer", "Connection reset by peer", "remote worker"))


def failure_at(who: str, where: str, e: Exception) -> ReplayFailure:
    verb = PEER_STOPPED if _peer_lost(e) else "failed"
    return ReplayFailure(f"{who} {verb} in {where}: {type(e).__name__}: {e}")


def rank_failure(ctx: Context, e: Exception) -> ReplayFailure:
    """The rank's error, naming where it was (ctx.position)."""
    return failure_at(f"rank {ctx.rank} (HDP rank {ctx.hdp_rank})", ctx.position.text, e)

"""A step's unit inputs, made ready before the step's clock starts, as a training job's data loader has the
next batch ready: per unit this rank runs, every member's zigzag layout (per SlimPipe slice) and this
member's input ids, labels and RoPE positions on the device.

Built inside the timed phase they left the device idle between units: on one H200, 4 to 8 ms per unit
(bench/data/h200-2026-12-04), a per-document Python loop on the host, which a cost model of training rightly
does not price."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from planner.plan import Step, Unit
from planner.runtime.cp import ShardLayout, shard_layout, slice_layout, unit_documents
from planner.runtime.model import IGNORE_INDEX, SequenceTokens

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (input ids, labels, RoPE positions) of one member


def unit_inputs(tokens: dict[int, SequenceTokens], layout: ShardLayout) -> Inputs:
    """(input ids, labels, RoPE positions) of a member's local tokens; padding gets id 0 and an
    ignored label."""
    inp = torch.zeros(layout.tokens, dtype=torch.long)
    lab = torch.full((layout.tokens,), IGNORE_INDEX, dtype=torch.long)
    for sid in layout.seq.unique().tolist():
        sel = (layout.seq == sid) & layout.valid
        pos = layout.pos[sel]
        inp[sel] = tokens[sid].ids[pos]
        lab[sel] = tokens[sid].labels[pos]
    return inp, lab, layout.pos


@dataclass(frozen=True)
class UnitInputs:
    """One unit's inputs on one member: layouts[slice][member] and this member's device inputs per slice."""

    index: int  # this member's position in the unit's hdp_ranks
    layouts: list[list[ShardLayout]]
    inputs: list[Inputs]


def _on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)  # pinned: the copy leaves the host free at once


def prepare_unit(unit: Unit, hdp_rank: int, tokens: dict[int, SequenceTokens], device: torch.device) -> UnitInputs:
    index = unit.hdp_ranks.index(hdp_rank)
    docs = unit_documents(unit.pieces)
    n = unit.slices
    if n == 1:
        layouts = [[shard_layout(docs, unit.degree, m) for m in range(unit.degree)]]
    else:
        layouts = [[slice_layout(docs, n, j, unit.degree, m) for m in range(unit.degree)] for j in range(n)]
    inputs = [tuple(_on_device(t, device) for t in unit_inputs(tokens, lay[index])) for lay in layouts]
    return UnitInputs(index, layouts, inputs)


def prepare_units(step: Step, unit_ids: list[int], hdp_rank: int, tokens: dict[int, SequenceTokens],
                  device: torch.device) -> dict[int, UnitInputs]:
    """The inputs of this rank's units `unit_ids` of `step`, keyed by unit id."""
    units = {u.id: u for u in step.units}
    return {uid: prepare_unit(units[uid], hdp_rank, tokens, device) for uid in dict.fromkeys(unit_ids)}

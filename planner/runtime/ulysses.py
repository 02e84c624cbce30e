"""Ulysses and 2D (head × context) attention for one unit, over P2P on the world group (no process group
per unit, as in planner/runtime/cp.py).

A unit over N members (hdp_ranks order) with Ulysses degree u (`Unit.ulysses`, dividing N) forms
R = N / u groups of u consecutive members; member i is in group g = i // u and holds head share
s = i % u (query heads s·Hq/u ..., K/V heads s·Hkv/u ..., per TP rank: contiguous, so GQA groups stay
whole; u must divide the K/V heads). Tokens stay zigzag over all N members (cp.shard_layout: member i
holds chunks i and 2N-1-i of each document), so group g together holds chunks gu .. gu+u-1 and their
mirrors: chunk g of a zigzag over R at u times the granularity (the padding is the N-member one).
Per layer (DeepSpeed-Ulysses, Jacobs et al. 2023; USP, Fang & Zhao 2024; LoongTrain's head-first 2D
placement, Gu et al. 2024):

1. all-to-all inside the group (`Peers.all_to_all`, one message per group peer and direction): member
   i sends each group peer its own tokens' Q/K/V heads of that peer's share, and receives the whole
   group's tokens for its share, sorted into the group's layout (by unit-wide key: document, then
   position, padding last in each document);
2. attention of its share over the group's tokens against every group's: ring or all-gather
   (cp.RingAttention / cp.GatherAttention, the unit's kind) between the R members holding share s,
   on the group layouts. R = 1 (pure Ulysses, u = N) is full-sequence attention under the same
   document-causal mask with nothing more to move;
3. the inverse all-to-all of the output (each member gets its own tokens back, all heads).

Backward: an all-to-all's gradient is the same exchange of the gradients (the exchange is its own
inverse); the attention's is cp.py's. Nothing here is T²: the block kernels run as in cp.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from planner.plan import Unit
from planner.runtime.cp import GatherAttention, Peers, RingAttention, ShardLayout
from planner.runtime.launch import CPImpl, check_heads


class _AllToAll(torch.autograd.Function):
    """parts [u, ...] -> [u, ...] over a group's Peers (part j to member j, slot j from member j);
    backward is the same exchange of the gradient."""

    @staticmethod
    def forward(ctx, parts: torch.Tensor, peers: Peers) -> torch.Tensor:
        ctx.peers = peers
        return peers.all_to_all(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.peers.all_to_all(grad), None


@dataclass(frozen=True)
class HeadSplit:
    """Where member `index` of a unit over `degree` members sits in a u × R split."""

    degree: int  # N: members of the unit
    ulysses: int  # u: members per Ulysses group (head shares)
    index: int  # this member's position in hdp_ranks

    @property
    def ring_degree(self) -> int:
        """R: groups, i.e. members of the context-parallel part."""
        return self.degree // self.ulysses

    @property
    def group(self) -> int:
        return self.index // self.ulysses

    @property
    def share(self) -> int:
        """Head share (index inside the group)."""
        return self.index % self.ulysses

    def group_members(self, g: int) -> range:
        return range(g * self.ulysses, (g + 1) * self.ulysses)

    def ring_members(self) -> list[int]:
        """The member holding this share in each group, in group order."""
        return [g * self.ulysses + self.share for g in range(self.ring_degree)]


def group_layout(layouts: list[ShardLayout], members: range, ring_degree: int, group: int
                 ) -> tuple[ShardLayout, torch.Tensor]:
    """(layout, perm): the tokens of `members` (their layouts concatenated in member order, as the
    all-to-all delivers them) sorted by unit-wide key, and perm with layout = concatenation[perm]. Keys
    rise with document then padded position, so real tokens sort by (document, position) as
    cp.layout_spans requires."""
    parts = [layouts[m] for m in members]
    key = torch.cat([p.key for p in parts])
    perm = torch.argsort(key)

    def field_(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name) for p in parts])[perm]

    lay = ShardLayout(ring_degree, group, field_("doc"), field_("seq"), field_("pos"), field_("valid"), key[perm], ())
    return lay, perm


class UlyssesAttention:
    """Attention of a unit with ulysses > 1 (pure Ulysses when it equals the degree, 2D otherwise); the
    Attention protocol of planner/runtime/model.py: q [T, Hq, D], k and v [T, Hkv, D] -> [T, Hq, D]."""

    def __init__(self, unit: Unit, layouts: list[ShardLayout], peers: Peers, kind: CPImpl, head_dim: int,
                 device: torch.device, kernel: str = "auto", block: int | None = None) -> None:
        split = HeadSplit(unit.degree, unit.ulysses, peers.index)
        self.unit, self.u = unit, unit.ulysses
        # both parts count towards the unit's traffic (one CommStats)
        self.group = Peers(tuple(peers.ranks[m] for m in split.group_members(split.group)), split.share, peers.stats)
        ring = Peers(tuple(peers.ranks[m] for m in split.ring_members()), split.group, peers.stats)
        groups = [group_layout(layouts, split.group_members(g), split.ring_degree, g)
                  for g in range(split.ring_degree)]
        perm = groups[split.group][1]
        self.perm, self.inverse = perm.to(device), torch.argsort(perm).to(device)
        lays = [lay for lay, _ in groups]
        self.inner = (RingAttention(lays, ring, head_dim, device, kernel, block) if kind == "ring"
                      else GatherAttention(lays, ring, device, kernel, block))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        t, hq, d = q.shape
        hkv, u = k.shape[1], self.u
        check_heads(self.unit, hkv)
        k, v = k.to(q.dtype), v.to(q.dtype)
        # [u, T, (Hq + 2 Hkv) / u, D]: share j of our tokens' Q, K and V heads, for group member j
        parts = torch.cat([x.reshape(t, u, x.shape[1] // u, d) for x in (q, k, v)], 2).transpose(0, 1)
        mine = _AllToAll.apply(parts, self.group).flatten(0, 1)[self.perm]  # the group's tokens, our share
        qg, kg, vg = mine.split([hq // u, hkv // u, hkv // u], 1)
        out = self.inner(qg, kg, vg, layer)[self.inverse]  # [u·T, Hq/u, D] back in member order
        back = _AllToAll.apply(out.reshape(u, t, hq // u, d), self.group)  # slot j: our tokens, share j
        return back.transpose(0, 1).reshape(t, hq, d)

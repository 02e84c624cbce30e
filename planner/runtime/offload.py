"""Selective activation offloading (REFERENCE 2.5): a unit's offload_ratio r moves that share of
the bytes saved for backward to host memory while the forward runs, and brings them back when
backward unpacks them.

The share is taken greedily in save order: a tensor goes to host when doing so keeps the
offloaded bytes at or below r times the bytes saved so far, so the achieved share tracks r at
every point of the forward (the first layers, needed last by backward, go first). Parameters
saved by autograd (weights of matmuls) are never copied: they stay resident anyway.

On GPU the copies run on side streams into pinned host buffers (copy engines, no SM time) and the
allocator is told the device tensor is in use by the copy stream until it finishes. On CPU the
"host" is a separate buffer: the copy is real and the numbers are identical."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn


@dataclass
class OffloadStats:
    """Saved-activation bytes of one unit's forward."""

    saved_bytes: int = 0  # all bytes autograd saved (parameters excluded)
    offloaded_bytes: int = 0  # of which moved to host
    tensors_offloaded: int = 0

    @property
    def resident_bytes(self) -> int:
        return self.saved_bytes - self.offloaded_bytes

    @property
    def achieved_ratio(self) -> float:
        return self.offloaded_bytes / self.saved_bytes if self.saved_bytes else 0.0


@dataclass
class _Offloaded:
    """A saved tensor living in host memory."""

    host: torch.Tensor  # dense copy
    device: torch.device
    stride: tuple[int, ...]  # the saved tensor's strides, restored on the way back
    ready: "torch.cuda.Event | None" = None  # D2H copy done (GPU only)


@dataclass
class Offloader:
    """saved_tensors_hooks implementation; one per unit (stats are per unit)."""

    ratio: float  # target share of saved bytes moved to host, in [0, 1]
    params: frozenset[int]  # data_ptr of every parameter: never offloaded
    stats: OffloadStats = field(default_factory=OffloadStats)
    _d2h: "torch.cuda.Stream | None" = None
    _h2d: "torch.cuda.Stream | None" = None

    def pack(self, t: torch.Tensor):
        if t.data_ptr() in self.params or t.numel() == 0:
            return t
        n = t.numel() * t.element_size()
        self.stats.saved_bytes += n
        if self.ratio <= 0.0 or self.stats.offloaded_bytes + n > self.ratio * self.stats.saved_bytes:
            return t
        self.stats.offloaded_bytes += n
        self.stats.tensors_offloaded += 1
        if t.device.type != "cuda":
            return _Offloaded(host=t.detach().clone(memory_format=torch.contiguous_format), device=t.device,
                              stride=t.stride())
        if self._d2h is None:
            self._d2h, self._h2d = torch.cuda.Stream(t.device), torch.cuda.Stream(t.device)
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self._d2h.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self._d2h):
            host.copy_(t, non_blocking=True)
            t.record_stream(self._d2h)  # keep t's memory from reuse until the copy has read it
            ready = torch.cuda.Event()
            ready.record(self._d2h)
        return _Offloaded(host=host, device=t.device, stride=t.stride(), ready=ready)

    def unpack(self, packed):
        """The saved tensor back with its own strides: a view saved by autograd (SwiGLU's gate and up) stays a
        view's layout, so kernels take the same path and the gradients are bitwise those without offload."""
        if not isinstance(packed, _Offloaded):
            return packed
        host = packed.host
        if packed.ready is None:
            return torch.empty_strided(host.shape, packed.stride, dtype=host.dtype).copy_(host)
        with torch.cuda.stream(self._h2d):
            self._h2d.wait_event(packed.ready)
            dev = torch.empty_strided(host.shape, packed.stride, dtype=host.dtype, device=packed.device)
            dev.copy_(host, non_blocking=True)
        cur = torch.cuda.current_stream(packed.device)
        cur.wait_stream(self._h2d)
        dev.record_stream(cur)
        return dev

    @contextmanager
    def active(self) -> Iterator["Offloader"]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield self


def parameter_pointers(model: nn.Module) -> frozenset[int]:
    return frozenset(p.data_ptr() for p in model.parameters())

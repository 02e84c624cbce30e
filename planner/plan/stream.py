"""Plans stored per step: the plan stream (`*.jsonl`), so that a rank of a run of thousands of steps
reads only the step it runs, never one giant JSON.

One JSON object per line (docs/PLAN_FORMAT.md, "The plan stream"):

    {"format": "meshplan.plan-stream/1", "schema_version": 1, "meta": {...}, "mesh": {...}}   header
    {"step": 0, "global_tokens": ..., "units": [...], ...}                                   one line per step,
    ...                                                                                       as plan.json's steps[i]
    {"index": {"steps": N, "offsets": [...], "sha256": [...]}}                                 last line

`offsets` holds the byte offset of each step line and, last, of the index line; `sha256` the first 16
hex digits of each step line's SHA-256 (its bytes without the newline). A reader takes the header (first
line) and the index (last line), then seeks to a step's line and reads only it; the line must hash to its
index entry, so a rank never runs an edited or torn step. The digest of header and index lines names the
whole stream (ranks compare it instead of hashing every step). The index is written last, so a stream
cut short while written has none and is refused; `write_stream` writes atomically anyway."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from planner.plan.schema import Plan, PlanError, Step
from planner.plan.validate import validate
from profiles.typed_json import Reader, show

STREAM_FORMAT = "meshplan.plan-stream/1"
STREAM_SUFFIX = ".jsonl"
STEP_HASH_HEX = 16  # hex digits of each step line's SHA-256 kept in the index (a 64-bit check per step)
_TAIL_BYTES = 1 << 16  # first guess at the index line's size when reading it from the end


def is_stream(path: str | Path) -> bool:
    """A plan path names a stream by its suffix (plan.jsonl, run.plan.jsonl); anything else is plan.json."""
    return str(path).endswith(STREAM_SUFFIX)


def _line(obj: Any) -> bytes:
    """One compact, deterministic JSON line."""
    return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode() + b"\n"


def _step_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()[:STEP_HASH_HEX]


def write_stream(plan: Plan, path: str | Path) -> Path:
    """Write `plan` as a plan stream at `path`, atomically (a reader sees the old file or the whole new one)."""
    from profiles.table import atomic_write  # pandas behind it: only where plans are written

    d = plan.to_dict()
    header = _line({"format": STREAM_FORMAT, "schema_version": d["schema_version"], "meta": d["meta"],
                    "mesh": d["mesh"]})

    def write(tmp: Path) -> None:
        offsets, hashes = [], []
        with open(tmp, "wb") as f:
            f.write(header)
            for st in d["steps"]:
                line = _line(st)
                offsets.append(f.tell())
                hashes.append(_step_hash(line))
                f.write(line)
            offsets.append(f.tell())
            f.write(_line({"index": {"steps": len(hashes), "offsets": offsets, "sha256": hashes}}))

    path = Path(path)
    atomic_write(path, write)
    return path


@dataclass(frozen=True)
class StreamIndex:
    """The last line of a stream: where each step's line starts and what it hashes to."""

    offsets: tuple[int, ...]  # byte offset of each step line, then of the index line (steps + 1 entries)
    sha256: tuple[str, ...]  # STEP_HASH_HEX hex digits of each step line's SHA-256

    @property
    def steps(self) -> int:
        return len(self.sha256)


class PlanStream:
    """An open plan stream: its header (meta and mesh, as a Plan without steps), its index, and
    `read_step(k)`, which reads and types step k's line only."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.readline()
                size = f.seek(0, 2)
                tail = _last_line(f, size)
        except OSError as e:
            raise PlanError(f"{self.path}: cannot read the plan stream ({e.strerror})") from None
        self.header = self._header(head)
        self.index = self._index(tail, len(head), size)
        self.digest = hashlib.sha256(head + tail).hexdigest()  # names every step through the index's hashes

    def _fail(self, problem: str) -> PlanError:
        return PlanError(f"{self.path}: {problem}")

    def _header(self, line: bytes) -> Plan:
        if not line:
            raise self._fail("empty file: not a plan stream; write one with `meshplan plan --out PATH.jsonl`")
        d = self._json(line, "header (first line)")
        if not isinstance(d, dict) or d.get("format") != STREAM_FORMAT:
            raise self._fail(f"not a plan stream: the first line must be a {STREAM_FORMAT} header, got "
                             f"{show(d.get('format') if isinstance(d, dict) else d)}; plans in one JSON object "
                             "are read from a .json path")
        rest = {k: v for k, v in d.items() if k != "format"}
        if "steps" in rest:
            raise self._fail("header: a stream's header holds no steps (one line per step follows it)")
        return Plan.from_dict({**rest, "steps": []}, origin=f"{self.path} header")

    def _index(self, line: bytes, header_bytes: int, size: int) -> StreamIndex:
        d = self._json(line, "index (last line)") if line.startswith(b'{"index"') else None
        if not isinstance(d, dict) or not isinstance(d.get("index"), dict):
            raise self._fail("truncated: no index on the last line (the stream was cut short while written); "
                             "write it again with `meshplan plan --out PATH.jsonl`")
        ix = Reader(f"{self.path}", PlanError).build(StreamIndex, d["index"], "index", ignore_unknown=True)
        n = d["index"].get("steps")
        off = ix.offsets
        if n != ix.steps or len(off) != n + 1 or not n:
            raise self._fail(f"index: {show(n)} steps need as many sha256 entries and one more offset, got "
                             f"{ix.steps} and {len(off)} (a stream holds at least one step)")
        if off[0] != header_bytes or any(b <= a for a, b in zip(off, off[1:])) or off[-1] + len(line) != size:
            raise self._fail("index: the offsets do not match the file's lines (edited or corrupt stream); write "
                             "it again with `meshplan plan --out PATH.jsonl`")
        return ix

    def _json(self, line: bytes, what: str) -> Any:
        try:
            return json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self._fail(f"truncated or corrupt {what}: {e}") from None

    @property
    def steps(self) -> int:
        return self.index.steps

    def read_step(self, k: int) -> Step:
        """Step k (0-based line, not the step's own number), typed; its line must hash to the index's entry.
        Consistency checks are `validate`'s (see `validated_step`)."""
        if not 0 <= k < self.steps:
            raise self._fail(f"step {k} out of range: the stream holds {self.steps} steps")
        start, end = self.index.offsets[k], self.index.offsets[k + 1]
        try:
            with open(self.path, "rb") as f:
                f.seek(start)
                line = f.read(end - start)
        except OSError as e:
            raise self._fail(f"cannot read step {k} ({e.strerror})") from None
        if len(line) != end - start or not line.endswith(b"\n") or _step_hash(line) != self.index.sha256[k]:
            raise self._fail(f"step {k}: its line does not match the index (sha256 {self.index.sha256[k]}...): the "
                             "file changed since it was written; write it again")
        d = self._json(line, f"step {k}")
        return Reader(str(self.path), PlanError).build(Step, d, f"steps[{k}]")

    def validated_step(self, k: int) -> Step:
        """Step k, checked by `validate` as a one-step plan of this stream's header."""
        st = self.read_step(k)
        validate(self.with_steps([st]))
        return st

    def with_steps(self, steps: list[Step]) -> Plan:
        return replace(self.header, steps=steps)

    def load(self) -> Plan:
        """Every step: the whole plan in memory (for tools that need it all: simulate, report)."""
        return self.with_steps([self.read_step(k) for k in range(self.steps)])


def _last_line(f, size: int) -> bytes:
    """The file's last line (its trailing newline included), read from the end."""
    want = _TAIL_BYTES
    while True:
        start = max(0, size - want)
        f.seek(start)
        chunk = f.read(size - start)
        cut = chunk.rfind(b"\n", 0, len(chunk) - 1)
        if cut >= 0 or start == 0:
            return chunk[cut + 1:]
        want *= 4


def load_plan(path: str | Path) -> Plan:
    """A whole plan from either form: a stream (`*.jsonl`) or one JSON object."""
    return PlanStream(path).load() if is_stream(path) else Plan.load(path)


def plan_fingerprint(path: str | Path) -> str:
    """What a replay trace records as plan_sha256: a plan JSON's SHA-256, a stream's digest (header and index,
    every step's hash, without reading the steps)."""
    return PlanStream(path).digest if is_stream(path) else hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write `plan` in the form its path names: a stream (`*.jsonl`) or one JSON object."""
    return write_stream(plan, path) if is_stream(path) else plan.save(path)


__all__ = ["STREAM_FORMAT", "PlanStream", "StreamIndex", "is_stream", "load_plan", "plan_fingerprint", "save_plan",
           "write_stream"]

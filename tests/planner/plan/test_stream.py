"""The plan stream (planner/plan/stream.py): a planned plan round-trips, a reader reads only the step
it asks for, and a truncated, torn or edited stream fails with one line."""

import json
from pathlib import Path

import pytest

from planner.api import PlanRequest, make_plan
from planner.plan import Plan, PlanError
from planner.plan.stream import STREAM_FORMAT, PlanStream, is_stream, load_plan, save_plan, write_stream

REQ = PlanRequest(model="tiny", cluster="local-cpu", gpus=4, profile="h100-sxm.analytic",
                  lengths="lognormal:median=60,sigma=1.0,max=300", tokens_per_step=1200, max_context_tokens=300,
                  capacity_tokens=200, seed=3, steps=4)


@pytest.fixture(scope="module")
def plan() -> Plan:
    with pytest.warns(UserWarning, match="profile"):  # an H100 profile for a CPU cluster: fine for the format
        return make_plan(REQ, "hdp")


@pytest.fixture
def stream(plan, tmp_path) -> Path:
    return write_stream(plan, tmp_path / "p.plan.jsonl")


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_stream_round_trips_and_holds_one_line_per_step(plan, stream, tmp_path):
    assert is_stream(stream) and not is_stream(tmp_path / "p.json")
    got = lines(stream)
    assert len(got) == 1 + len(plan.steps) + 1  # header, one line per step, index
    head = json.loads(got[0])
    assert head["format"] == STREAM_FORMAT and "steps" not in head and head["mesh"]["hdp"] == 4
    assert [json.loads(x)["step"] for x in got[1:-1]] == [0, 1, 2, 3]
    s = PlanStream(stream)
    assert s.steps == 4 and s.header.mesh == plan.mesh and s.header.meta == plan.meta and s.header.steps == []
    assert load_plan(stream).to_dict() == plan.to_dict()
    assert s.validated_step(2) == plan.steps[2]
    # the form follows the suffix; the same plan gives the same bytes
    assert save_plan(plan, tmp_path / "again.jsonl").read_bytes() == stream.read_bytes()
    assert json.loads(save_plan(plan, tmp_path / "p.json").read_text()) == plan.to_dict()
    assert load_plan(tmp_path / "p.json").to_dict() == plan.to_dict()


def test_a_reader_touches_only_the_step_it_reads(plan, stream):
    """Every other step line is overwritten (same length, so the index still points at the lines):
    steps 1 and 3 still read, the garbled ones are refused, naming the step."""
    got = lines(stream)
    for k in (0, 2):
        got[1 + k] = b"x" * (len(got[1 + k]) - 1) + b"\n"
    stream.write_bytes(b"".join(got))
    s = PlanStream(stream)
    assert s.read_step(1) == plan.steps[1] and s.read_step(3) == plan.steps[3]
    with pytest.raises(PlanError, match=r"step 2: its line does not match the index"):
        s.read_step(2)


def test_reading_a_step_seeks_to_its_line(plan, stream, monkeypatch):
    """The bytes a step read takes from the file: exactly that step's line."""
    read: list[int] = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def seek(self, *a):
            return self.f.seek(*a)

        def read(self, n=-1):
            data = self.f.read(n)
            read.append(len(data))
            return data

    s = PlanStream(stream)
    monkeypatch.setattr("builtins.open", lambda *a, **k: Counting(real_open(*a, **k)))
    s.read_step(3)
    assert read == [len(lines(stream)[4])]


def _problems(stream: Path, tmp_path: Path) -> list[tuple[Path, str]]:
    data = stream.read_bytes()
    got = lines(stream)
    cases = {"cut.jsonl": (data[: len(data) // 2], "truncated: no index on the last line"),
             "cut_at_line.jsonl": (b"".join(got[:-1]), "truncated: no index on the last line"),
             "empty.jsonl": (b"", "not a plan stream"),
             "one_json.jsonl": (json.dumps({"schema_version": 1}).encode(), "not a plan stream"),
             "torn_header.jsonl": (got[0][:40] + b"\n" + b"".join(got[1:]), "truncated or corrupt header"),
             "extra_line.jsonl": (b"".join(got[:2] + [got[1]] + got[2:]), "the offsets do not match the file's lines"),
             "edited_step.jsonl": (b"".join(got[:2] + [got[2].replace(b'"step":1', b'"step":7')] + got[3:]),
                                   "step 1: its line does not match the index")}
    out = []
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        out.append((tmp_path / name, message))
    return out


def test_bad_streams_fail_with_one_line(stream, tmp_path):
    for path, message in _problems(stream, tmp_path):
        with pytest.raises(PlanError) as e:
            PlanStream(path).read_step(1)
        text = str(e.value)
        assert message in text and "\n" not in text and text.startswith(str(path)), (path.name, text)
    with pytest.raises(PlanError, match="step 4 out of range: the stream holds 4 steps"):
        PlanStream(stream).read_step(4)
    with pytest.raises(PlanError, match="cannot read the plan stream"):
        PlanStream(tmp_path / "missing.jsonl")


def test_cli_writes_a_stream_and_replay_refuses_a_bad_one_in_one_line(stream, tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")  # the replay command checks it is installed before the plan
    from cli import app

    monkeypatch.chdir(tmp_path)
    try:
        app(["plan", "--model", "tiny", "--cluster", "local-cpu", "--gpus", "2", "--lengths",
             "lognormal:median=60,sigma=1.0,max=300", "--max-context", "300", "--tokens-per-step", "600",
             "--steps", "3", "--strategy", "hdp", "--compare", "hdp", "--out", "cli.jsonl", "--json"],
            prog_name="meshplan")
    except SystemExit as e:
        assert not e.code, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["plan"] == "cli.jsonl"
    assert PlanStream(tmp_path / "cli.jsonl").steps == 3
    for path, message in _problems(stream, tmp_path):
        if "edited_step" in path.name:  # step 1 is checked by the ranks as they run it, not before the job starts
            continue
        with pytest.raises(SystemExit) as exit_:
            app(["replay", str(path), "--nproc", "4"], prog_name="meshplan")
        out = capsys.readouterr()
        err = " ".join(out.err.split())  # rich wraps long lines
        assert exit_.value.code == 2 and err.startswith("error:") and message in err, (path.name, out.err)
        assert "Traceback" not in err and out.out == ""

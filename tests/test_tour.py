"""README.md's "A short tour", run as written: every command of its code block, in order, in one
folder holding a copy of examples/ (the tour runs from the repository root), must exit 0. Marked
`tour` (minutes on a 2-core CPU; `-m "not tour"` leaves it out)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

pytestmark = pytest.mark.tour

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # per command: generous; the tour says each takes seconds to a minute


def tour_commands(readme: Path = ROOT / "README.md") -> list[list[str]]:
    """The argument lists of the `meshplan` lines in the first code block after "## A short tour"."""
    section = readme.read_text(encoding="utf-8").split("## A short tour", 1)[1]
    block = re.search(r"```[a-z]*\n(.*?)```", section, re.S)
    assert block, "README.md: no code block in the tour"
    commands = [shlex.split(line, comments=True) for line in block.group(1).splitlines() if line.strip()]
    assert commands and all(c[0] == "meshplan" for c in commands), commands
    return [c[1:] for c in commands]


COMMANDS = tour_commands()


@pytest.fixture(scope="module")
def tour_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tour")
    shutil.copytree(ROOT / "examples", d / "examples")
    (d / "tmp").mkdir()
    return d


def test_tour_uses_only_shipped_files():
    """Every input path the tour names (a --lengths file) is in the repository."""
    for args in COMMANDS:
        for flag, value in zip(args, args[1:]):
            if flag == "--lengths" and "/" in value:
                assert (ROOT / value).is_file(), f"the tour reads {value}, which the repository does not ship"


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c)[:70] for c in COMMANDS])
def test_tour_command_runs(args, tour_dir):
    """Commands share tour_dir and run in README order (later ones read earlier ones' files)."""
    if args[0] == "replay" and find_spec("torch") is None:
        pytest.skip("replay needs the runtime extra (torch)")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["MPLBACKEND"] = "Agg"
    env["TMPDIR"] = str(tour_dir / "tmp")  # a newcomer's first run: no journal left in /tmp by earlier runs
    # Own session: a command over time is ended with every process it started (torchrun ranks, workers).
    with subprocess.Popen([sys.executable, "-c", "from cli import app; app(prog_name='meshplan')", *args],
                          cwd=tour_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            _, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"meshplan {shlex.join(args)} ran over {TIMEOUT_S} s")
    assert proc.returncode == 0, f"meshplan {shlex.join(args)} exited {proc.returncode}:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]

"""bench/elementwise_kinds.py on this machine's CPU, small operands: every kind is timed and its bandwidth is its
bytes over its time, relative to the memory table's kernel."""

import json

import pytest

pytest.importorskip("torch")

from bench.elementwise_kinds import main  # noqa: E402
from costmodel.elementwise import KINDS  # noqa: E402
from profiles.measure.memory import KIND_OF_KERNEL  # noqa: E402


def test_every_kind_is_timed_against_the_table_kernel(tmp_path, capsys):
    assert main(["--tokens", "256", "--hidden", "256", "--vocab", "4096", "--device", "cpu",
                 "--json", str(tmp_path / "k.json")]) == 0
    d = json.loads((tmp_path / "k.json").read_text())
    kinds = {k["kind"]: k for k in d["kinds"]}
    assert {"table_add", "cast", "bcast_mul", "head_transpose", "log_softmax"} <= set(kinds)
    assert kinds["table_add"]["bytes"] == 4 * 256 * 256 and kinds["table_add"]["vs_table"] == 1.0
    for k in d["kinds"]:
        assert k["time_s"] > 0
        assert k["gb_per_s"] == pytest.approx(k["bytes"] / k["time_s"] / 1e9)
        assert k["vs_table"] == pytest.approx(k["gb_per_s"] / kinds["table_add"]["gb_per_s"])
    assert "log_softmax" in capsys.readouterr().out


def test_the_kinds_measured_are_the_kinds_the_cost_model_prices():
    assert set(KIND_OF_KERNEL.values()) | {"stream"} == set(KINDS)

"""bench/slice_overhead.py: a small unit measured whole and sliced in one process, and the simulator's price of the
same slices."""

import pytest

from bench.slice_overhead import main, measure, priced


def test_slices_are_measured_against_the_whole_unit_and_priced(capsys):
    pytest.importorskip("torch")
    got = measure("tiny", [96, 40], [2, 4], rounds=1, device="cpu")
    assert set(got) == {2, 4} and all(len(v) == 1 and v[0] > 0 for v in got.values())
    # on a GPU profile's small-m GEMM rates, 8 slices of an 8K document cost more than the whole (eager kernels)
    x = priced("llama3-8b", [8192], [2, 8], "h100-sxm.analytic")
    assert 1.0 < x[2] < x[8]
    main(["--docs", "64", "--slices", "2", "--rounds", "1"])
    assert "| 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--slices"):
        main(["--docs", "3", "--slices", "4"])

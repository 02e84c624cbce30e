"""Batch unit pricing (issue 18): `CostModel.price_units` is the one implementation of a unit's cost and
`unit_cost` a batch of one, so pricing thousands of units at once must give exactly what pricing them
one by one gives (plans are compared byte for byte across planner versions)."""

import dataclasses

import numpy as np
import pytest

from costmodel.presets import load_cluster, load_model
from costmodel.specs import Setup, TrainingSpec
from costmodel.timing import CostModel, UnitCost, UnitCosts, _segment_sums
from profiles.table import load_profile

SETUPS = [dict(), dict(recompute="full"), dict(tp=2, pp=2, recompute="selective"), dict(tp=8, pp=4, recompute="full"),
          dict(tp=4, recompute="selective", attention_kernel="unfused")]


def _mixed_units(rng: np.random.Generator, n: int) -> list[tuple[list[int], int, float, bool, bool | None]]:
    """Packed bins (1 to 200 documents) and sharded units (degrees 1 to 8, a few larger), with and without
    offload, inside and across nodes, with the head, without it and by default."""
    units = []
    for k in range(n):
        docs = int(rng.choice([1, 1, 2, 3, 7, 8, 9, 16, 40, 200]))
        lengths = rng.integers(1, 300_000 if docs == 1 else 20_000, docs).tolist()
        degree = int(rng.choice([1, 1, 2, 3, 4, 5, 6, 7, 8, 16, 64]))
        units.append((lengths, degree, float(rng.choice([0.0, 0.0, 0.25, 1.0])), bool(rng.integers(2)),
                      (None, True, False)[k % 3]))
    return units


@pytest.mark.parametrize("spec", SETUPS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_batch_pricing_equals_per_unit_pricing(spec):
    cluster = load_cluster("dgx-h100").with_gpus(64)
    cm = CostModel(Setup(load_model("llama-7b"), cluster, TrainingSpec(**spec)), load_profile("h100-sxm.analytic"))
    units = _mixed_units(np.random.default_rng(len(spec)), 240)
    for with_head in (None, True, False):
        lengths = np.array([s for u in units for s in u[0]], dtype=float)
        offsets = np.cumsum([0] + [len(u[0]) for u in units[:-1]])
        batch = cm.price_units(lengths, offsets, [u[1] for u in units], [u[2] for u in units],
                               [u[3] for u in units], with_head=with_head)
        one_by_one = [cm.unit_cost(u[0], u[1], u[2], u[3], with_head=with_head) for u in units]
        assert batch.units() == one_by_one  # exact: the same operations in the same order
        assert batch.total_s.tolist() == [u.total_s for u in one_by_one]
        assert [batch.unit(k) for k in (0, 17, len(units) - 1)] == [one_by_one[k] for k in (0, 17, len(units) - 1)]
    # per-unit with_head (the simulator's middle and last stages in one call)
    heads = [bool(k % 2) for k in range(len(units))]
    mixed = cm.price_units(lengths, offsets, [u[1] for u in units], [u[2] for u in units], [u[3] for u in units],
                           with_head=heads).units()
    assert mixed == [cm.unit_cost(u[0], u[1], u[2], u[3], with_head=h) for u, h in zip(units, heads)]
    assert any(u.ring_comm_s > 0 for u in mixed) and {u.head_fwd_s > 0 for u in mixed} == {True, False}


def test_batch_of_none_and_empty_units():
    cm = CostModel(Setup(load_model("llama-7b"), load_cluster("dgx-h100").with_gpus(64), TrainingSpec()),
                   load_profile("h100-sxm.analytic"))
    assert len(cm.price_units(np.zeros(0), np.zeros(0, dtype=np.int64))) == 0
    empty = cm.price_units(np.array([4096.0]), np.array([0, 1, 1]), 1).units()  # units 1 and 2 hold nothing
    assert empty[1] == empty[2] == cm.unit_cost([], 1) and empty[1].tokens_per_rank == 0
    assert empty[0] == cm.unit_cost([4096], 1)


def test_segment_sums_are_numpys_contiguous_sums():
    rng = np.random.default_rng(3)
    counts = rng.choice([0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 130, 1000], 300)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    values = rng.random((2, int(counts.sum()))) * rng.choice([1e-6, 1.0, 1e6], (2, int(counts.sum())))
    got = _segment_sums(values, starts, counts)
    want = [[float(row[a:a + c].sum()) for a, c in zip(starts, counts)] for row in values]
    assert got.tolist() == want  # bit for bit: np.add.reduceat would not be


def test_unit_costs_mirror_unit_cost_fields():
    assert [f.name for f in dataclasses.fields(UnitCosts)] == [f.name for f in dataclasses.fields(UnitCost)]

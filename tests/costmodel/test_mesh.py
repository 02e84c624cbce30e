"""MeshLayout: rank arithmetic by hand and as a round trip, validation messages, each domain rule."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from costmodel.mesh import MeshLayout
from costmodel.presets import load_cluster, load_model
from costmodel.specs import Setup, SpecError, TrainingSpec
from planner.plan import Mesh

# tp 2, pp 2, 8 HDP ranks per stage, 8-GPU nodes: 4 HDP ranks a node, a stage fills 2 nodes
MESH = MeshLayout(tp=2, pp=2, hdp=8, gpus_per_domain=8)


def test_sizes_and_ranks_by_hand():
    assert (MESH.world_size, MESH.stage_size, MESH.hdp_per_domain) == (32, 16, 4)
    assert MESH.global_rank(1, 3, 1) == 16 + 3 * 2 + 1 == 23
    assert MESH.global_rank(0, 5) == 10
    assert MESH.coordinates(23) == (1, 3, 1)
    assert MESH.coordinates(0) == (0, 0, 0) and MESH.coordinates(31) == (1, 7, 1)
    assert [MESH.domain_of(g) for g in (0, 7, 8, 23, 31)] == [0, 0, 1, 2, 3]
    with pytest.raises(SpecError, match="global rank 32 is outside the mesh of 32 ranks"):
        MESH.coordinates(32)


@given(tp=st.integers(1, 8), pp=st.integers(1, 8), hdp=st.integers(1, 64), tp_groups_per_domain=st.integers(1, 8),
       data=st.data())
def test_global_rank_and_coordinates_are_inverse(tp, pp, hdp, tp_groups_per_domain, data):
    mesh = MeshLayout(tp=tp, pp=pp, hdp=hdp, gpus_per_domain=tp * tp_groups_per_domain)
    g = data.draw(st.integers(0, mesh.world_size - 1))
    assert mesh.global_rank(*mesh.coordinates(g)) == g
    coords = (data.draw(st.integers(0, pp - 1)), data.draw(st.integers(0, hdp - 1)), data.draw(st.integers(0, tp - 1)))
    assert mesh.coordinates(mesh.global_rank(*coords)) == coords
    # a unit's sorted HDP ranks span domains exactly when their stage-0 GPUs sit in more than one
    ranks = sorted(data.draw(st.sets(st.integers(0, hdp - 1), min_size=1, max_size=8)))
    domains = {mesh.domain_of(mesh.global_rank(0, r, t)) for r in ranks for t in range(tp)}
    assert mesh.spans_domains(ranks) == (len(domains) > 1)


def test_validation_messages():
    with pytest.raises(SpecError, match="tp=16 exceeds the 8 GPUs of a node; TP must stay inside one NVLink domain"):
        MeshLayout(tp=16, pp=1, hdp=1, gpus_per_domain=8)
    with pytest.raises(SpecError, match="tp=3 must divide the 8 GPUs per node"):
        MeshLayout(tp=3, pp=1, hdp=1, gpus_per_domain=8)
    with pytest.raises(SpecError, match="mesh: hdp: expected an integer > 0, got 0"):
        MeshLayout(tp=1, pp=1, hdp=0, gpus_per_domain=8)
    with pytest.raises(SpecError, match="world size 12 is not divisible by tp\\*pp = 8"):
        MeshLayout.of_world(12, 2, 4, 8)
    with pytest.raises(SpecError, match="tp=16 exceeds"):  # TP is checked before the world size
        MeshLayout.of_world(8, 16, 1, 8)
    assert MeshLayout.of_world(64, 2, 4, 8) == MeshLayout(tp=2, pp=4, hdp=8, gpus_per_domain=8)


def test_spans_domains():
    assert not MESH.spans_domains(()) and not MESH.spans_domains((5,))
    assert not MESH.spans_domains((0, 1, 2, 3)) and not MESH.spans_domains((4, 7))
    assert MESH.spans_domains((3, 4)) and MESH.spans_domains((0, 7))


def test_group_spans_domains():
    assert not MESH.group_spans_domains(1) and not MESH.group_spans_domains(4)
    assert MESH.group_spans_domains(5) and MESH.group_spans_domains(8)


def test_stages_in_different_domains():
    # 64 GPUs, tp 1, pp 4: 16 HDP ranks per stage, 8-GPU nodes: a stage is 2 nodes
    mesh = MeshLayout(tp=1, pp=4, hdp=16, gpus_per_domain=8)
    assert mesh.stages_in_different_domains(0, 1, 0) and mesh.stages_in_different_domains(2, 3, 15)
    assert not mesh.stages_in_different_domains(1, 1, 3)
    # two 2-GPU stages share one node
    small = MeshLayout(tp=1, pp=2, hdp=2, gpus_per_domain=8)
    assert not small.stages_in_different_domains(0, 1, 1)


def test_adjacent_stages_in_different_domains():
    assert MESH.adjacent_stages_in_different_domains  # a stage is 16 GPUs: 2 nodes
    assert MeshLayout(tp=2, pp=2, hdp=4, gpus_per_domain=8).adjacent_stages_in_different_domains  # exactly 1 node
    assert not MeshLayout(tp=1, pp=2, hdp=4, gpus_per_domain=8).adjacent_stages_in_different_domains


def test_setup_mesh_and_its_checks():
    setup = Setup(load_model("llama-7b"), load_cluster("dgx-h100").with_gpus(64), TrainingSpec(tp=2, pp=2))
    assert setup.mesh == MeshLayout(tp=2, pp=2, hdp=16, gpus_per_domain=8) and setup.hdp == 16
    with pytest.raises(SpecError, match="world size 8 is not divisible by tp\\*pp = 16"):
        Setup(load_model("llama-7b"), load_cluster("dgx-h100").with_gpus(8), TrainingSpec(pp=16))


def test_plan_mesh_uses_the_same_formula():
    mesh = Mesh(world_size=32, tp=2, pp=2, hdp=8)
    assert mesh.global_rank(1, 3, 1) == MESH.global_rank(1, 3, 1)
    assert [mesh.coordinates(g) for g in range(32)] == [MESH.coordinates(g) for g in range(32)]

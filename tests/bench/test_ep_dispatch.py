"""bench/ep_dispatch.py: the inter-node MoE rows under each dispatcher and overlap; DeepEP sends fewer bytes over
the NIC than NCCL's all-to-all and the overlap hides some of what is left, so each variant is at most the one
before it; the row's own recipe is the validation's prediction."""

import json

from bench.ep_dispatch import main
from planner.studies.validation import validate_cost_model


def test_variants_order_and_the_recipe_matches_validate(tmp_path, capsys):
    main(["--json", str(tmp_path / "r.json")])
    rows = json.loads((tmp_path / "r.json").read_text())
    assert "4 of 8 groups" in capsys.readouterr().out
    cases = {r["case"] for r in rows}
    assert any(c.startswith("DeepSeek-V3") for c in cases) and any(c.startswith("Qwen3-235B") for c in cases)
    published = {r.case: r.predicted for r in validate_cost_model(None, "megatron_bridge_moe2025").rows}
    for case in cases:
        v = {(r["dispatcher"], r["ep_comm_overlap"]): r for r in rows if r["case"] == case}
        assert v["flex", False]["predicted_s"] < v["alltoall", False]["predicted_s"]
        assert v["alltoall", True]["predicted_s"] < v["alltoall", False]["predicted_s"]
        assert v["flex", True]["predicted_s"] < v["flex", False]["predicted_s"]
        assert v["flex", True]["exposed_comm_share"] < v["alltoall", False]["exposed_comm_share"]
        (own,) = [r for r in v.values() if r["recipe"]]
        assert own["predicted_s"] == published[case]

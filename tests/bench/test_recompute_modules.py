"""bench/recompute_modules.py: every layout's none, full and selective rows, and the module rows that act on it; the
orderings Megatron-core's semantics imply (full keeps the least; core_attn frees nothing under FlashAttention but
replays the core; moe frees more than moe_act and replays more)."""

import json

from bench.recompute_modules import CASES, main


def test_rows_and_their_orderings(tmp_path, capsys):
    main(["--json", str(tmp_path / "r.json")])
    rows = json.loads((tmp_path / "r.json").read_text())
    assert "core_attn" in capsys.readouterr().out
    for label, *_ in CASES:
        r = {x["recompute"]: x for x in rows if x["case"] == label}
        assert {"none", "full", "selective", "core_attn"} <= set(r)
        assert all(x["fits"] for x in r.values())
        saved = {k: x["saved_bytes_per_token_layer"] for k, x in r.items()}
        assert min(saved, key=saved.get) == "full"
        assert saved["core_attn"] == saved["none"] and r["core_attn"]["bwd_ms"] > r["none"]["bwd_ms"]
        assert all(x["fwd_ms"] == r["none"]["fwd_ms"] for x in r.values())  # recompute costs backward time only
        if "moe" in r:
            assert saved["moe"] < saved["layernorm,moe_act"] < saved["none"]
            assert r["moe"]["bwd_ms"] > r["layernorm,moe_act"]["bwd_ms"]
            assert r["moe"]["capacity_tokens"] > r["none"]["capacity_tokens"]
    assert "mla_up_proj" in {x["recompute"] for x in rows} and "mlp" in {x["recompute"] for x in rows}

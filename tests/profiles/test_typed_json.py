"""Validation at the boundary: a bad spec, HuggingFace config, cluster, profile or plan file gives one
error of the package's type naming the file and the field, never a traceback or a silent accept."""

import copy
import dataclasses
import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from costmodel.presets import load_cluster, load_model
from costmodel.specs import ClusterSpec, ModelSpec, SpecError
from costmodel.timing import CostModel
from planner.api import PlanRequest, build_cost_model, make_plan
from planner.plan import Plan, PlanError, validate
from profiles.table import Profile, ProfileError, load_profile

REPO = Path(__file__).resolve().parents[2]
HF_LLAMA = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32, "hidden_size": 4096,
            "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
            "rope_theta": 10000.0, "torch_dtype": "float16"}


def write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))  # allow_nan: NaN / Infinity reach the loaders as JSON can carry them
    return path


def one_line(e: pytest.ExceptionInfo, *words: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


# ---- HuggingFace config.json ------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [
    ("num_attention_heads", 0), ("num_attention_heads", "32"), ("num_attention_heads", None),
    ("num_attention_heads", 5),  # does not divide hidden_size (and no head_dim)
    ("num_hidden_layers", 32.0), ("num_hidden_layers", True), ("num_hidden_layers", -2),
    ("hidden_size", [4096]), ("vocab_size", float("nan")), ("intermediate_size", float("inf")),
    ("num_key_value_heads", 5), ("tie_word_embeddings", "false"), ("head_dim", 0),
])
def test_hf_config_bad_field_named(tmp_path, key, value):
    p = write(tmp_path / "config.json", {**HF_LLAMA, key: value})
    with pytest.raises(SpecError) as e:
        load_model(str(p))
    one_line(e, str(p), key)


def test_hf_config_head_dim_lifts_divisibility_and_moe_top_k(tmp_path):
    m = load_model(str(write(tmp_path / "a.json", {**HF_LLAMA, "num_attention_heads": 5, "num_key_value_heads": 5,
                                                    "head_dim": 128})))
    assert (m.heads, m.head_dim) == (5, 128)
    moe = {**HF_LLAMA, "num_local_experts": 4, "num_experts_per_tok": 8}
    with pytest.raises(SpecError) as e:
        load_model(str(write(tmp_path / "b.json", moe)))
    one_line(e, "num_experts_per_tok (8) cannot exceed num_local_experts (4)")


# ---- model and cluster spec files -------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [
    ("inter_node_bw_bytes_per_s", float("inf")), ("intra_node_bw_bytes_per_s", float("nan")),
    ("host_link_bw_bytes_per_s", 0), ("gpu_memory_bytes", 80e9), ("gpu_memory_bytes", "80GB"),
    ("nodes", True), ("gpus_per_node", None), ("profile", 3), ("name", ["x"]), ("nics", 8),
])
def test_cluster_file_bad_field_named(tmp_path, key, value):
    d = dataclasses.asdict(load_cluster("dgx-h100"))
    p = write(tmp_path / "c.json", {**d, key: value})
    with pytest.raises(SpecError) as e:
        load_cluster(str(p))
    one_line(e, str(p), key)


def test_cluster_infinite_bandwidth_written_as_json_number(tmp_path):
    d = dataclasses.asdict(load_cluster("dgx-h100"))
    p = tmp_path / "c.json"
    key = '"inter_node_bw_bytes_per_s": '
    p.write_text(json.dumps(d).replace(key + json.dumps(d["inter_node_bw_bytes_per_s"]), key + "1e999"))  # inf
    with pytest.raises(SpecError) as e:
        load_cluster(str(p))
    one_line(e, str(p), "inter_node_bw_bytes_per_s", "finite")


@pytest.mark.parametrize("key,value", [("layers", 32.0), ("layers", False), ("heads", "32"), ("kv_heads", 3),
                                       ("top_k", 4), ("qkv_bias", 1), ("ffn", -1), ("vocab", None)])
def test_model_file_bad_field_named(tmp_path, key, value):
    p = write(tmp_path / "m.json", {**dataclasses.asdict(load_model("llama-7b")), key: value})
    with pytest.raises(SpecError) as e:
        load_model(str(p))
    one_line(e, str(p), key)


# ---- non-JSON, truncated and non-object files, every loader -----------------------------------------

LOADERS = [(load_model, SpecError), (load_cluster, SpecError), (load_profile, ProfileError), (Plan.load, PlanError)]


@pytest.mark.parametrize("loader,error", LOADERS)
@pytest.mark.parametrize("text,words", [('{"a": 1,\n "b": ', ["line 2"]), ("not json at all", ["line 1"]),
                                        ("[1, 2]", []), ('"a string"', []), ("", ["line 1"])])
def test_corrupt_or_non_object_file_is_one_line(tmp_path, loader, error, text, words):
    p = tmp_path / "f.json"
    p.write_text(text)
    with pytest.raises(error) as e:
        loader(str(p))
    one_line(e, str(p), *words)


# ---- profiles -----------------------------------------------------------------------------------------

@functools.cache
def cpu_profile_dict() -> dict:
    d = json.loads(load_profile("local-cpu.measured").to_json())
    d["fingerprint"]["sha256"] = ""  # edits below must meet the content checks, not the hash check
    return d


@pytest.mark.parametrize("table,row,col,value", [
    ("gemm", 0, 4, -1.0), ("gemm", 1, 4, "0.1"), ("gemm", 2, 0, 128.5), ("attention", 0, 1, "yes"),
    ("collective", 3, 0, "allreduce"), ("collective", 0, 4, float("inf")), ("host_copy", 0, 2, None),
])
def test_profile_bad_cell_names_table_and_column(tmp_path, table, row, col, value):
    d = copy.deepcopy(cpu_profile_dict())
    d["tables"][table]["rows"][row][col] = value
    column = d["tables"][table]["columns"][col]
    with pytest.raises(ProfileError) as e:
        load_profile(str(write(tmp_path / "p.json", d)))
    one_line(e, "p.json", f"tables.{table}.rows[{row}].{column}")


@pytest.mark.parametrize("edit,words", [
    (lambda d: d["tables"]["gemm"]["rows"][0].pop(), ["tables.gemm.rows[0]", "expected 5 values"]),
    (lambda d: d["tables"]["gemm"]["columns"].__setitem__(2, "kk"), ["tables.gemm", "'k'"]),
    (lambda d: d["tables"].__setitem__("gemmm", {"columns": [], "rows": []}), ["gemmm"]),
    (lambda d: d["constants"]["peak_bf16_flops"].__setitem__("value", "fast"), ["constants.peak_bf16_flops.value"]),
    (lambda d: d["fits"]["tiny"].__setitem__("r2", None), ["fits.tiny.r2"]),
    (lambda d: d["fingerprint"].__setitem__("source", "guessed"), ["fingerprint.source"]),
    (lambda d: d.__setitem__("tables", [1]), ["tables"]),
])
def test_profile_bad_structure_named(tmp_path, edit, words):
    d = copy.deepcopy(cpu_profile_dict())
    edit(d)
    with pytest.raises(ProfileError) as e:
        load_profile(str(write(tmp_path / "p.json", d)))
    one_line(e, "p.json", *words)


def test_profile_with_empty_tables_loads_but_cannot_cost(tmp_path):
    """A partial profile (measured with --ops) is a valid file; a cost model on it names what is missing."""
    d = copy.deepcopy(cpu_profile_dict())
    for t in d["tables"].values():
        t["rows"] = []
    prof = load_profile(str(write(tmp_path / "p.json", d)))
    with pytest.raises(ProfileError) as e:
        CostModel(tiny_setup(), prof)
    one_line(e, "gemm, attention, collective, host_copy", "--ops")


# ---- plans --------------------------------------------------------------------------------------------

@functools.cache
def plan_dict() -> dict:
    """A real plan with a pipeline section, several units and sharded documents."""
    req = PlanRequest(model="tiny", cluster="local-cpu", gpus=4, pp=2, tokens_per_step=32768,
                      max_context_tokens=8192)
    return make_plan(req, "hdp").to_dict()


@pytest.mark.parametrize("path,value,words", [
    (("mesh",), "4x1", ["mesh: expected an object"]),
    (("mesh", "tp"), "1", ["mesh.tp"]),
    (("steps", 0, "units", 0, "offload_ratio"), "0.5", ["steps[0].units[0].offload_ratio"]),
    (("steps", 0, "units", 0, "slices"), 2.5, ["steps[0].units[0].slices: expected an integer >= 1, got 2.5"]),
    (("steps", 0, "units", 0, "hdp_ranks"), [[0]], ["steps[0].units[0].hdp_ranks[0]"]),
    (("steps", 0, "predicted", "step_time_s"), "fast", ["steps[0].predicted.step_time_s"]),
    (("steps", 0, "predicted", "breakdown", "compute"), None, ["steps[0].predicted.breakdown.compute"]),
    (("steps", 0, "sequences", 0, "length"), True, ["steps[0].sequences[0].length"]),
    (("steps", 0, "pipeline", "v"), 1.0, ["steps[0].pipeline.v"]),
    (("meta", "model_spec", "layers"), 2.0, ["meta.model_spec.layers"]),
    (("meta", "training", "recompute"), "some", ["meta.training.recompute"]),
    (("meta", "capacity_tokens"), "big", ["meta.capacity_tokens"]),
    (("meta", "profile"), "local-cpu.measured", ["meta.profile"]),
    (("steps", 0, "unit_count"), 3, ["steps[0]: unknown field(s) ['unit_count']"]),
])
def test_plan_bad_field_named_with_json_path(tmp_path, path, value, words):
    d = copy.deepcopy(plan_dict())
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(PlanError) as e:
        Plan.load(write(tmp_path / "plan.json", d))
    one_line(e, "plan.json", *words)


def test_plan_order_key_and_absurd_mesh(tmp_path):
    d = copy.deepcopy(plan_dict())
    d["steps"][0]["order"]["rank0"] = []
    with pytest.raises(PlanError) as e:
        Plan.from_dict(d, "p.json")
    one_line(e, "p.json: steps[0].order", "rank0")
    d = copy.deepcopy(plan_dict())
    d["mesh"] = {"world_size": 10**15, "tp": 1, "pp": 1, "hdp": 10**15}  # must fail fast, not loop over ranks
    with pytest.raises(PlanError, match="per-rank lists"):
        validate(Plan.from_dict(d))


def test_valid_plan_round_trips_unchanged():
    d = plan_dict()
    assert Plan.from_dict(copy.deepcopy(d)).to_dict() == d


@pytest.mark.parametrize("argv", [["simulate"], ["report", "--gantt", "g.png"]])
def test_cli_bad_plan_is_one_error_line(tmp_path, argv):
    d = copy.deepcopy(plan_dict())
    d["mesh"] = "4"
    bad = write(tmp_path / "bad.json", d)
    res = subprocess.run([sys.executable, "-m", "cli", argv[0], str(bad), *argv[1:]], capture_output=True,
                         text=True, cwd=tmp_path, env=_env(), timeout=300)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr + res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "mesh" in lines[0], res.stderr


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", "MPLBACKEND": "Agg"}


# ---- properties: one field anywhere replaced by a wrong value -----------------------------------------

BAD_VALUES = ["x", "", None, True, False, float("nan"), float("inf"), -float("inf"), -1, -2.5, 0, 2.5,
              [[1]], [], {}, {"a": 1}]


def json_paths(obj, prefix=()):
    """Every path to a value inside a JSON document."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return
    for k, v in items:
        yield prefix + (k,)
        yield from json_paths(v, prefix + (k,))


def replaced(doc, path, value):
    d = copy.deepcopy(doc)
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return d


def mutate(data, doc):
    """doc with one value, at a drawn JSON path, replaced by a drawn wrong value."""
    path = data.draw(st.sampled_from(list(json_paths(doc))), label="path")
    return replaced(doc, path, data.draw(st.sampled_from(BAD_VALUES), label="value"))


def property_test(examples: int):
    return settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@property_test(150)
@given(data=st.data())
def test_model_spec_rejects_or_keeps_any_single_bad_value(data):
    d = mutate(data, dataclasses.asdict(load_model("mistral-8x7b")))
    try:
        spec = ModelSpec.from_dict(d, "m.json")
    except SpecError as e:
        assert str(e).startswith("m.json: ") and "\n" not in str(e)
        return
    assert dataclasses.asdict(spec) == d  # accepted only as written: nothing coerced


@property_test(150)
@given(data=st.data())
def test_cluster_spec_rejects_or_keeps_any_single_bad_value(data):
    d = mutate(data, dataclasses.asdict(load_cluster("dgx-h100")))
    try:
        spec = ClusterSpec.from_dict(d, "c.json")
    except SpecError as e:
        assert str(e).startswith("c.json: ") and "\n" not in str(e)
        return
    assert dataclasses.asdict(spec) == d
    assert all(math.isfinite(getattr(spec, f)) and getattr(spec, f) > 0 for f in d if f.endswith("_s"))


@property_test(100)
@given(data=st.data())
def test_hf_config_rejects_or_reads_any_single_bad_value(tmp_path_factory, data):
    p = write(tmp_path_factory.mktemp("hf") / "config.json", mutate(data, HF_LLAMA))
    try:
        load_model(str(p))
    except SpecError as e:
        assert str(e).startswith(str(p)) and "\n" not in str(e)


@property_test(300)
@given(data=st.data())
def test_plan_rejects_or_keeps_any_single_bad_value(data):
    d = mutate(data, plan_dict())
    try:
        plan = Plan.from_dict(d, "p.json")
        validate(plan)
    except PlanError as e:
        assert "\n" not in str(e)
        return
    written = plan.to_dict()
    for s, w in zip(d["steps"], written["steps"]) if isinstance(d.get("steps"), list) else ():
        if isinstance(s, dict) and "pipeline" in s and s["pipeline"] is None:
            del s["pipeline"]  # null and absent both mean "no pipeline section"; the writer omits it
        elif isinstance(s, dict) and isinstance(s.get("pipeline"), dict):
            sec = s["pipeline"]
            if sec.get("weights", 0) is None:
                del sec["weights"]  # likewise "no weights": count-based in-flight budget
            # the writer spells out the section's defaults (schedule, v; max_chunks where its schedule reads it)
            assert all(w["pipeline"][k] == v for k, v in sec.items() if k in w["pipeline"]), (sec, w["pipeline"])
            s["pipeline"] = {**w["pipeline"], **{k: v for k, v in sec.items() if k in w["pipeline"]}}
    assert written == d  # accepted only as written: nothing coerced


@functools.cache
def tiny_setup():
    return build_cost_model(PlanRequest(model="tiny", cluster="local-cpu", gpus=4)).setup


@property_test(60)
@given(data=st.data())
def test_profile_rejects_or_costs_any_single_bad_value(data):
    """Accepted edits (free text, extra columns) still give a cost model or a ProfileError."""
    d = mutate(data, cpu_profile_dict())
    try:
        CostModel(tiny_setup(), Profile.from_dict(d, "p.json"))
    except ProfileError as e:
        assert "\n" not in str(e)

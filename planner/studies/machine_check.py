"""`meshplan machine-check`: validate a machine (GPU or CPU) end to end within one wall-time budget.

GPU machines come rarely and for minutes, so one prepared command does everything in order and writes it all
under one folder:

1. environment: device, driver, torch / CUDA / NCCL versions, whether flash-attn imports (a child process);
2. a quick profile (profiles/measure: GEMM in every dtype the device runs well, attention fwd/bwd varlen, memory
   and on GPU its elementwise kinds, host copies, collectives with >= 2 GPUs) with a time budget per table, written
   to profile.json;
3. small real plans (the plan API) replayed with `meshplan replay --check` (bf16 on GPU, fp32 on CPU): one rank,
   and several ranks (NCCL on >= 2 GPUs; on one GPU the multi-rank path runs over gloo on the CPU, since the
   executor maps local rank i to cuda:i); multi-rank plans get a second replay without --check for timing, free of
   the reference's copies and gathers between the steps;
4. predicted vs measured per unit and per step (planner.simulate.measured) on the device's reference profile
   (its cluster preset's: analytic on GPU) and on the fresh one, with the mean absolute percentage error;
5. summary.md and machine_check.json; `ok` is False when any check failed or was skipped for lack of time.

The budget cannot be overrun: the total is split into phase budgets (each phase gets a share of what is left,
so an early phase that finishes sooner leaves more to the later ones), every phase runs in child processes
killed (their whole process group) when its budget ends, and the profile child stops each table at its own
share (the rows measured so far are kept). This module is torch-free: torch runs only in the children
(profiles/measure, planner/runtime); `python -m planner.studies.machine_check env|profile` are those children."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pandas as pd

from costmodel.presets import cluster_names, load_cluster, load_model
from costmodel.timing import fit_models
from planner.api import PlanRequest, device_kind, cost_model_for_plan, make_plan
from planner.plan import Plan, PlanError
from planner.simulate.measured import compare_measured, warm_steps
from planner.studies.calibrate import read_trace
from profiles.table import Fingerprint, Profile, ProfileError, atomic_write_text, load_profile

DEFAULT_BUDGET_S = {"cuda": 480.0, "cpu": 180.0}  # the 8 minutes on GPU; CPU: ~70 s used on 2 busy cores
MARGIN = 0.05  # share of the total kept for the comparison, the summary and the CLI's own start-up
ENV_BUDGET_S = 60.0  # the environment child (import torch, CUDA context, flash-attn) at most this
PHASES = (("profile", 4.0), ("replay", 5.0))  # weights: each phase gets its share of the time left
TABLE_SHARES = {"gemm": 0.3, "attention": 0.3, "memory": 0.1, "host_copy": 0.1, "collective": 0.2}
TABLE_ORDER = ("gemm", "attention", "memory", "host_copy", "collective")  # what the cost model needs most first
KINDS_MIN_S = 5.0  # GPU: the elementwise kinds (a few s) follow the memory table when this much of its share is left
CHILD_START_S = {"cpu": 5.0, "cuda": 20.0}  # a child's start (imports, CUDA context) before its budget counts
MIN_RUN_S = {"cpu": 10.0, "cuda": 20.0}  # a replay is not started with less time than this left
KILL_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this
# --check tolerances (tests/planner/runtime): fp32 agrees to summation order, bf16 to a few ulps (check.py)
CPU_DTYPE = "fp32"  # the CPU cases' replays (torch's CPU default; bf16 is emulated, ~100x slower, on most CPUs)
GRAD_TOL = {"fp32": 1e-4, "bf16": 3e-2}
LOSS_TOL = {"fp32": 1e-5, "bf16": 1e-2}
# On GPU the tiny model would time only kernel launches: a small Llama-style model whose GEMMs the profile
# measures (about 110M parameters: weights, fp32 master copy and AdamW fit any GPU).
GPU_MODEL = dict(name="machine-check-small", layers=4, hidden=1024, heads=16, kv_heads=4, head_dim=64, ffn=2816,
                 vocab=32000, source="meshplan machine-check: a small Llama-style model for GPU replays")
CPU_LENGTHS = "lognormal:median=300,sigma=1.4,max=2048"
CPU_REFERENCE = "local-cpu.measured"  # the local-cpu cluster preset's profile: CPU cases are priced on it
Status = Literal["ok", "failed", "skipped", "n/a"]


@dataclass(frozen=True)
class MachineCheckRequest:
    """What `meshplan machine-check` was asked for."""

    out_dir: Path  # everything is written here
    device: str | None = None  # "cpu" | "cuda"; None: cuda when torch sees one
    budget_s: float | None = None  # total wall time; None: DEFAULT_BUDGET_S of the device
    steps: int = 6  # replay iterations per plan (each plan step's first replay is left out as warm-up)
    seed: int = 0  # lengths, model init, tokens
    cases: tuple[str, ...] | None = None  # replay only these cases (replay_cases names); None: all of the device's

    def __post_init__(self) -> None:
        if self.device not in (None, "cpu", "cuda"):
            raise ProfileError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ProfileError(f"--budget-s must be a positive number of seconds, got {self.budget_s}")
        if self.steps < 2:
            raise ProfileError(f"--steps must be at least 2 (the first iteration is warm-up), got {self.steps}")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ProfileError(f"--out {self.out_dir}: is a file, give a folder")


@dataclass(frozen=True)
class CheckRow:
    """One check: a phase's part and how it went."""

    phase: str  # environment | profile | replay | compare
    name: str
    status: Status
    seconds: float
    detail: str


@dataclass(frozen=True)
class ReplayCase:
    """A small real plan and how it is replayed."""

    name: str
    exercises: str
    device: str  # where the replay runs: cpu | cuda
    dtype: str  # fp32 | bf16
    model: str  # preset name or model JSON path (passed to `meshplan replay --model`)
    cluster: str  # preset name or cluster JSON path
    ranks: int
    strategy: str
    lengths: str
    tokens_per_step: int
    max_context_tokens: int
    capacity_tokens: int
    tp: int = 1
    plan_steps: int = 2  # global batches planned; the timing replay cycles them
    ring_kernel: str = "auto"  # `meshplan replay --ring-kernel`

    @property
    def separate_timing(self) -> bool:
        """Multi-rank: timing gets a replay of its own, without --check's whole-model copy and reference step on
        rank 0 and its gathers between the steps: they stay out of the timed phases (rank 0's peers wait for it in
        a barrier), but they move the host's memory and caches."""
        return self.ranks > 1


@dataclass(frozen=True)
class Accuracy:
    """Predicted vs measured for one replayed plan on one profile: per unit (median over the timed iterations)
    and per plan step; errors are predicted / measured - 1, MAPE the mean of their absolute values."""

    case: str
    role: Literal["reference", "fresh"]
    profile: str  # profile name
    unit_mape: float
    step_mape: float
    units: tuple[dict, ...]  # {plan_step, unit, stage, predicted_s, measured_s, rel_err}
    steps: tuple[dict, ...]  # {plan_step, predicted_s, measured_s, rel_err}
    iterations: int  # timed iterations used (each plan step's cold first replay left out)
    host_slowdown: float | None = None  # CPU: the replay's host probe over the profile's (compare_measured)


@dataclass
class MachineCheck:
    """Everything `meshplan machine-check` found; `ok` when no check failed or was skipped."""

    out_dir: Path
    device: str
    budget_s: float
    environment: dict
    checks: list[CheckRow] = field(default_factory=list)
    accuracy: list[Accuracy] = field(default_factory=list)
    elapsed_s: float = 0.0
    phase_budgets_s: dict[str, float] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)  # predicted vs measured, drawn (machine_check's `draw`)

    @property
    def ok(self) -> bool:
        return all(c.status in ("ok", "n/a") for c in self.checks)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "out_dir": str(self.out_dir), "device": self.device, "budget_s": self.budget_s,
                "elapsed_s": self.elapsed_s, "phase_budgets_s": self.phase_budgets_s,
                "environment": self.environment, "checks": [dataclasses.asdict(c) for c in self.checks],
                "accuracy": [dataclasses.asdict(a) for a in self.accuracy],
                "figures": [str(f) for f in self.figures]}


# ---- budgets and child processes ------------------------------------------------------------------------
class Budget:
    """The total wall time, and each phase's share of what is left when it starts."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.start = time.monotonic()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.start

    def left_s(self) -> float:
        """What the phases may still spend (the margin kept back)."""
        return max(0.0, self.total_s * (1 - MARGIN) - self.elapsed_s())

    def phase_s(self, phase: str) -> float:
        names = [p for p, _ in PHASES]
        weights = dict(PHASES)
        later = names[names.index(phase):]
        return self.left_s() * weights[phase] / sum(weights[p] for p in later)


def _child_env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the tree holding cli, planner and profiles
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_child(cmd: list[str], timeout_s: float, log: Path, env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """Run cmd in a session of its own (stdout captured, stderr to `log`); (exit code, stdout), the code None when
    it ran past timeout_s: then its whole process group (torchrun and its ranks included) is ended."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env or _child_env(),
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=max(timeout_s, 0.1))
            return proc.returncode, out
        except subprocess.TimeoutExpired:
            _end_group(proc)
            return None, ""
        except BaseException:  # Ctrl-C: leave no ranks behind
            _end_group(proc)
            raise


def _end_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.communicate(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


def _last_line(log: Path) -> str:
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()] if log.exists() else []
    errors = [x for x in lines if x.startswith("error:") or "Error" in x]
    return (errors or lines or ["no output"])[-1][:300]


def _worker(*args: str) -> list[str]:
    return [sys.executable, "-m", "planner.studies.machine_check", *args]


# ---- 1. environment ----------------------------------------------------------------------------------
def _nvidia_smi() -> dict[str, str]:
    """Driver and GPUs as nvidia-smi reports them (torch does not know the driver version)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    for fields in ("name,driver_version,memory.total,compute_cap", "name,driver_version,memory.total"):
        try:
            res = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return {}
        if res.returncode == 0 and res.stdout.strip():
            rows = [[c.strip() for c in r.split(",")] for r in res.stdout.strip().splitlines()]
            keys = fields.split(",")
            first = dict(zip(keys, rows[0]))
            return {"driver": first.get("driver_version", ""), "gpu_memory_mib": first.get("memory.total", ""),
                    "compute_capability": first.get("compute_cap", ""), "nvidia_smi_gpus": str(len(rows))}
    return {}


def environment(device: str | None, log: Path, timeout_s: float = ENV_BUDGET_S) -> dict:
    """Phase 1: the environment child's report plus nvidia-smi's. Raises ProfileError for a request this
    machine cannot serve (no torch, --device cuda without a GPU)."""
    code, out = run_child(_worker("env", *(["--device", device] if device else [])), timeout_s, log)
    if code is None:
        raise ProfileError(f"the environment check (import torch, start the device) took over {timeout_s:.0f} s, "
                           f"its share of the budget; see {log}, or give a larger --budget-s")
    try:
        env = json.loads(out.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise ProfileError(f"the environment check failed (exit {code}): {_last_line(log)}; see {log}") from None
    if env.get("error"):
        raise ProfileError(env["error"])
    if env["device"] == "cuda":
        env.update(_nvidia_smi())
    return env


def _env_worker(device: str | None) -> int:
    from profiles.measure import MeasureError, device_fingerprint
    from profiles.measure.runner import detect_device

    try:
        found = detect_device()
    except MeasureError as e:
        print(json.dumps({"error": str(e)}))
        return 0
    if device == "cuda" and found != "cuda":
        print(json.dumps({"error": "--device cuda: torch sees no CUDA device here; leave --device out (or pass "
                                   "--device cpu) to check the CPU"}))
        return 0
    device = device or found
    flash = "not installed"
    if find_spec("flash_attn") is not None:
        try:  # a probe, as the attention benchmark and the executor import it: a broken build says how
            import flash_attn  # type: ignore[import-not-found]
            flash = str(getattr(flash_attn, "__version__", "installed"))
        except Exception as e:  # noqa: BLE001 -- ImportError, or an ABI error raised by the extension
            flash = f"not importable: {type(e).__name__}: {e}"[:300]
    desc, versions = device_fingerprint(device)
    print(json.dumps({"device": device, "detected": found, "description": desc, "versions": versions,
                      "flash_attn": flash, "gpus": int(versions.get("gpus", 0) or 0)}))
    return 0


# ---- 2. profile ----------------------------------------------------------------------------------------
def _pow2(lo: int, hi: int, step: int = 2) -> tuple[int, ...]:
    out = [lo]
    while out[-1] * step <= hi:
        out.append(out[-1] * step)
    return tuple(out)


def check_config(cfg, head_dim: int):
    """The quick profile's plan (profiles.measure.plan_config), cut to what a machine check needs: on CPU a few
    points per table (seconds), on GPU the quick grids with the model's head dimension and fewer memory passes."""
    from profiles.measure import TimingConfig

    if cfg.device == "cuda":
        return dataclasses.replace(cfg, attn_head_dims=tuple(sorted({head_dim, 128})), mem_rounds=3)
    return dataclasses.replace(
        cfg, timing=TimingConfig(warmup=1, repeats=5, min_repeats=2, budget_s=0.1),
        gemm_tokens=_pow2(128, 2048), gemm_flop_cap=2e9, gemm_generic_edges=(128, 256, 512), gemm_generic_nk=512,
        attn_head_dims=(head_dim,), attn_lengths=_pow2(128, 2048), attn_pack_tokens=2048, attn_docmask_lengths=(),
        copy_sizes=_pow2(4096, 16 * 2**20, 4), mem_sizes=_pow2(4096, 16 * 2**20), mem_rounds=2,
        mem_timing=TimingConfig(warmup=1, repeats=5, min_repeats=2, budget_s=0.02),
        passes=1)  # a table cut at its budget keeps the points timed so far: one pass gives them as they come


class _OutOfTime(Exception):
    """A table's budget ran out: the rows measured so far are kept."""


def _profile_worker(device: str, out: Path, budget_s: float, model: str, reference: str | None) -> int:
    """The profile child: each table in TABLE_ORDER with its share of the budget left, the rows file rewritten
    (atomically) after each table, so a kill loses at most the table in progress."""
    from costmodel.timing import profile_gemm_shapes
    from profiles.measure import TABLES, device_fingerprint
    from profiles.measure.attention import COLUMNS as ATTENTION_COLUMNS
    from profiles.measure.memory import COLUMNS as MEMORY_COLUMNS
    from profiles.measure.runner import (ProfileRequest, build_config, choose_dtypes, estimate_seconds,
                                         measure_table, plan_counts)
    from profiles.table import TABLE_COLUMNS

    end = time.monotonic() + budget_s
    spec = load_model(model)
    desc, versions = device_fingerprint(device)
    dtypes, dtype_note = choose_dtypes(device)
    if device == "cpu" and dtypes != (CPU_DTYPE,):  # a CPU with fast bf16: every CPU case replays (and is priced)
        dtypes = (CPU_DTYPE,)  # in fp32, so bf16 tables would only spend the check's budget (and be its main dtype)
        dtype_note += f"; only {CPU_DTYPE} here: the CPU replays run in it"
    req = ProfileRequest(out=out, quick=True, device=device, model_shapes=profile_gemm_shapes({spec.name: spec}),
                         nproc=None if device == "cuda" else 1)
    cfg = check_config(build_config(req, device, dtypes), spec.head_dim)
    counts = plan_counts(cfg)
    try:  # how long each table should take on the reference's numbers: said next to its budget
        est = estimate_seconds(cfg, load_profile(reference)) if reference else {}
    except ProfileError:
        est = {}
    todo = [t for t in TABLE_ORDER if t in TABLES and (t != "collective" or cfg.nproc >= 2)]
    columns = {"attention": ATTENTION_COLUMNS, "memory": MEMORY_COLUMNS}
    doc = {"device": device, "description": desc, "versions": versions, "dtype_note": dtype_note,
           "config": cfg.key(), "model": spec.name, "tables": {}}
    if device == "cpu":  # the host probe before and after the tables, as `meshplan profile` records it
        from profiles.measure.probe import host_probe_s
        doc["host_probe_s"] = [host_probe_s()]
    for i, name in enumerate(todo):
        left = end - time.monotonic()
        share = left * TABLE_SHARES[name] / sum(TABLE_SHARES[t] for t in todo[i:])
        rows: list = []
        stop = time.monotonic() + share

        def tick(_done: int, _total: int) -> None:
            if time.monotonic() > stop:
                raise _OutOfTime

        t0 = time.perf_counter()
        entry = {"points": counts[name], "budget_s": share, "estimated_s": est.get(name), "cut": False, "error": None}
        if share <= 0:
            entry.update(rows=[], columns=[], seconds=0.0, error="no time left in the profile budget")
            doc["tables"][name] = entry
            continue
        try:
            df = measure_table(name, cfg, tick, on_row=rows.append)
            cols, rows = list(df.columns), [list(r) for r in df.itertuples(index=False)]
        except _OutOfTime:
            entry["cut"] = True
            cols = columns.get(name, TABLE_COLUMNS[name]) if rows else []
        except Exception as e:  # noqa: BLE001 -- one table failing (a kernel, NCCL) must not hide the others
            entry["error"] = f"{type(e).__name__}: {e}"[:500]
            cols, rows = [], []
        entry.update(columns=list(cols), rows=[[_py(v) for v in r] for r in rows], seconds=time.perf_counter() - t0)
        doc["tables"][name] = entry
        if name == "memory" and rows and device == "cuda" and stop - time.monotonic() > KINDS_MIN_S:
            from profiles.measure.memory import memory_kind_constants  # the kinds' ratios to the memory table's kernel
            _refine(doc, "memory_kinds", lambda: memory_kind_constants(device, cfg.main_dtype))
        if name == "attention" and rows and device == "cpu":  # as `meshplan profile` does on CPU (under a second)
            from planner.runtime.call_overhead import attention_call_overhead
            _refine(doc, "attn_call_overhead",
                    lambda: attention_call_overhead(spec.heads, spec.kv_heads, spec.head_dim))
        atomic_write_text(out, json.dumps(doc) + "\n")
    if "host_probe_s" in doc:
        doc["host_probe_s"].append(host_probe_s())
    atomic_write_text(out, json.dumps(doc) + "\n")
    return 0


def _refine(doc: dict, key: str, measure) -> None:
    """A measurement that refines a table (`meshplan profile` takes it too) into doc[key]; its error into
    doc[key + "_error"], since its failure must not lose the table it refines."""
    try:
        doc[key] = measure()
    except Exception as e:  # noqa: BLE001 -- any failure of the refinement (a kernel, an import) is recorded
        doc[f"{key}_error"] = f"{type(e).__name__}: {e}"[:500]


def _py(v):
    return v.item() if isinstance(v, np.generic) else v


def build_profile(rows_file: Path, name: str) -> tuple[Profile, dict]:
    """The fresh profile from the profile child's rows (only tables with rows), with the measured peak and the
    notes of what was cut; and the child's document (tables' budgets, cuts, errors)."""
    from profiles.measure import MeasureConfig, cores_constant
    from profiles.measure.probe import probe_constant
    from profiles.measure.runner import memory_note, peak_constant

    doc = json.loads(rows_file.read_text())
    cfg = MeasureConfig.from_key(doc["config"])
    tables = {t: pd.DataFrame(e["rows"], columns=e["columns"]) for t, e in doc["tables"].items() if e["rows"]}
    constants = {}
    if "gemm" in tables:
        constants["peak_bf16_flops"] = peak_constant(tables["gemm"], cfg.main_dtype, doc["device"])
        constants["gemm_large_flops"] = dict(constants["peak_bf16_flops"])
    if doc["device"] == "cpu":  # ranks beyond the cores share them at a fair share (no slowdown probe: its budget)
        constants["cores_per_node"] = cores_constant()
    constants.update(doc.get("memory_kinds") or {})  # GPU: measured after the memory table when its budget allowed
    if doc.get("attn_call_overhead"):  # CPU: measured after the attention table
        constants["attn_call_overhead_s"] = doc["attn_call_overhead"]
    probes = doc.get("host_probe_s") or []
    if len(probes) == 2:  # a child cut short before its last table has only the first
        constants["host_probe_s"] = probe_constant(*probes)
    said = "; ".join(f"{t} {len(e['rows'])}/{e['points']} points in {e['seconds']:.1f} s (budget {e['budget_s']:.0f} s"
                     + (", cut" if e["cut"] else "") + (f", error {e['error']}" if e["error"] else "") + ")"
                     for t, e in doc["tables"].items())
    notes = (f"meshplan machine-check quick profile, main dtype {cfg.main_dtype}. {doc['dtype_note']}. Per table: "
             f"{said}. " + (memory_note(cfg, None) if "memory" in tables else "")
             + ("" if "collective" in tables else " No collective table (one device).")
             + (" Elementwise kinds (memory_kind_*) measured after the memory table." if doc.get("memory_kinds")
                else ""))
    fp = Fingerprint(name=name, device=doc["description"], source="measured",
                     created=datetime.now(timezone.utc).isoformat(timespec="seconds"), versions=doc["versions"],
                     notes=notes)
    return Profile(fingerprint=fp, tables=tables, constants=constants), doc


def completed_profile(fresh: Profile, reference: Profile, name: str) -> Profile:
    """`fresh` with each table it lacks taken from `reference` (the cost model needs rows in every table: one GPU
    measures no collectives); the notes say which. Constants are the fresh ones: a measured GEMM table must not
    get an analytic profile's tile quantisation."""
    missing = [t for t, df in fresh.tables.items() if df.empty and not reference.tables[t].empty]
    tables = {t: (reference.tables[t] if t in missing else df).copy() for t, df in fresh.tables.items()}
    fp = dataclasses.replace(fresh.fingerprint, name=name, sha256="",
                             notes=fresh.fingerprint.notes + (f" Tables {', '.join(missing)} from "
                                                              f"{reference.fingerprint.name} (sha256 "
                                                              f"{reference.fingerprint.sha256[:12]})." if missing
                                                              else ""))
    return Profile(fingerprint=fp, tables=tables, constants=dict(fresh.constants), fits=dict(fresh.fits))


# ---- 3. plans and replays ------------------------------------------------------------------------------
def _cluster_preset(description: str) -> str | None:
    """The cluster preset whose GPU is this device (h200 -> hgx-h200), if any."""
    kind = device_kind(description)
    for name in cluster_names():
        if kind and device_kind(load_cluster(name).gpu) == kind:
            return name
    return None


def write_gpu_specs(out_dir: Path, env: dict) -> tuple[Path, Path, str | None]:
    """model.json (GPU_MODEL) and cluster.json (this machine: its preset resized to its GPUs, or a one-node
    cluster with the GPU's memory and NVLink-class links when no preset names the GPU); and the preset used."""
    model = out_dir / "model.json"
    atomic_write_text(model, json.dumps(GPU_MODEL, indent=1) + "\n")
    preset = _cluster_preset(env["description"])
    gpus = max(1, env.get("gpus", 1))
    if preset is not None:
        c = load_cluster(preset)
        c = c.with_gpus(gpus) if gpus <= c.gpus_per_node else c.with_gpus(c.gpus_per_node)
        d = {**c.to_dict(), "name": "machine-check", "source": f"{preset} resized to this machine's {gpus} GPU(s)"}
    else:
        mem = float(env.get("gpu_memory_mib") or 80 * 1024) * 2**20
        d = {**load_cluster("dgx-h100").to_dict(), "name": "machine-check", "gpu": env["description"], "nodes": 1,
             "gpus_per_node": gpus, "gpu_memory_bytes": int(mem),
             "source": "meshplan machine-check: this machine; links and host numbers of dgx-h100 (no preset names "
                       "this GPU)"}
    d.pop("world_size", None)
    cluster = out_dir / "cluster.json"
    atomic_write_text(cluster, json.dumps(d, indent=1) + "\n")
    return model, cluster, preset


def replay_cases(device: str, gpus: int, model: str, cluster: str) -> list[ReplayCase]:
    """CPU: one rank (packed bins) and two ranks over gloo (a 2-rank context-parallel unit). GPU: two single-rank
    plans (packed short documents, long documents) in bf16; with >= 2 GPUs an HDP plan over up to 8 GPUs (on the
    default and on the CUDA flash block kernel) and a tp = 2 plan over NCCL, with one GPU the two-rank gloo plan on
    the CPU."""
    cpu2 = ReplayCase("cpu2-gloo", "2 ranks over gloo, a 2-rank context-parallel unit", "cpu", CPU_DTYPE, "tiny",
                      "local-cpu", 2, "hdp", CPU_LENGTHS, 4096, 2048, 1024)
    if device == "cpu":
        return [ReplayCase("cpu1", "one rank, packed bins", "cpu", CPU_DTYPE, "tiny", "local-cpu", 1, "static",
                           CPU_LENGTHS, 2048, 2048, 1024), cpu2]
    cases = [ReplayCase("gpu1-packed", "one GPU, packed short documents (flash-attn varlen when installed)", "cuda",
                        "bf16", model, cluster, 1, "static", "lognormal:median=600,sigma=1.2,max=16384", 65536,
                        16384, 16384),
             ReplayCase("gpu1-long", "one GPU, long documents", "cuda", "bf16", model, cluster, 1, "static",
                        "lognormal:median=8000,sigma=1.0,max=32768", 65536, 32768, 32768)]
    if gpus >= 2:
        n = min(gpus, 8)
        hdp = ReplayCase(f"gpu{n}-hdp", f"{n} GPUs over NCCL, context-parallel units", "cuda", "bf16", model,
                         cluster, n, "hdp", "lognormal:median=2000,sigma=1.4,max=32768", n * 16384,
                         min(32768, n * 8192), 8192)
        cases += [hdp, dataclasses.replace(hdp, name=f"{hdp.name}-flash", ring_kernel="flash-cuda",
                                           exercises=hdp.exercises + " on the CUDA flash block kernel"),
                  ReplayCase("gpu2-tp", "tp = 2 over NCCL", "cuda", "bf16", model, cluster, 2, "static",
                             "lognormal:median=600,sigma=1.2,max=16384", 32768, 16384, 16384, tp=2)]
    else:
        cases.append(dataclasses.replace(cpu2, exercises=cpu2.exercises + " (one GPU: the executor maps local rank i "
                                         "to cuda:i, so ranks cannot share it)"))
    return cases


def make_case_plan(case: ReplayCase, profile: str, path: Path, seed: int) -> Plan:
    req = PlanRequest(model=case.model, cluster=case.cluster, gpus=case.ranks, tp=case.tp, profile=profile,
                      lengths=case.lengths, steps=case.plan_steps, tokens_per_step=case.tokens_per_step,
                      max_context_tokens=case.max_context_tokens, capacity_tokens=case.capacity_tokens, seed=seed,
                      dtype=case.dtype, kernels="eager", sequence_parallel=False)  # priced as the replay runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a stand-in profile of another device is said in the summary instead
        plan = make_plan(req, case.strategy)
    plan.save(path)
    return plan


@dataclass(frozen=True)
class ReplayRun:
    """One `meshplan replay` of a case."""

    case: ReplayCase
    kind: Literal["check", "timing", "check+timing"]
    plan_path: Path
    trace_path: Path | None
    iterations: int


def replay_command(run: ReplayRun, timeout_s: float) -> list[str]:
    c = run.case
    cmd = [sys.executable, "-m", "cli", "replay", str(run.plan_path), "--nproc", str(c.ranks), "--model", c.model,
           "--dtype", c.dtype, "--device", c.device, "--steps", str(run.iterations), "--ring-kernel", c.ring_kernel,
           "--timeout-s", f"{max(30.0, min(300.0, timeout_s)):.0f}"]
    cmd += ["--check"] if "check" in run.kind else []
    cmd += ["--trace", str(run.trace_path)] if run.trace_path is not None else []
    return cmd


def judge_replay(run: ReplayRun, code: int | None, out: str, log: Path, seconds: float, timeout_s: float) -> CheckRow:
    """The check row of one replay: finished, its --check within the dtype's tolerance, its trace complete."""
    name = f"{run.case.name} {run.kind}"
    if code is None:
        return CheckRow("replay", name, "failed", seconds, f"did not finish within its {timeout_s:.0f} s; see {log}")
    if code:
        return CheckRow("replay", name, "failed", seconds, f"exit {code}: {_last_line(log)}")
    said = []
    if "check" in run.kind:
        lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        chk = next((x["check"] for x in lines if "check" in x), None)
        if chk is None:
            return CheckRow("replay", name, "failed", seconds, "no check line in its output")
        g, lo = GRAD_TOL[run.case.dtype], LOSS_TOL[run.case.dtype]
        good = chk["max_rel_grad_err"] < g and chk["loss_abs_err"] < lo
        said.append(f"max rel grad err {chk['max_rel_grad_err']:.2e} (< {g:g}), loss err {chk['loss_abs_err']:.2e} "
                    f"(< {lo:g}), {chk['units']} units on {chk['ranks']} rank(s)")
        if not good:
            return CheckRow("replay", name, "failed", seconds, "; ".join(said) + ": beyond tolerance")
    if run.trace_path is not None:
        try:
            read_trace(run.trace_path)
        except PlanError as e:
            return CheckRow("replay", name, "failed", seconds, str(e))
        said.append(f"trace {run.trace_path.name}, {run.iterations} iterations")
    return CheckRow("replay", name, "ok", seconds, "; ".join(said))


# ---- 4. predicted vs measured --------------------------------------------------------------------------
def accuracy(case: str, role: Literal["reference", "fresh"], plan: Plan, profile: str, trace: dict) -> Accuracy:
    """Predicted (the plan on `profile`) vs measured (the trace), cold iterations left out (`warm_steps`): per
    (plan step, unit, stage) the median measured time over the iterations that replayed it, per plan step the
    median step time."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = cost_model_for_plan(plan, profile)
    c = compare_measured(plan, cm, trace)
    kept = {s["step"] for s in warm_steps(trace)}
    timed = [s for s in c.steps if s["step"] in kept]
    by_unit: dict[tuple[int, int, int], list[tuple[float, float]]] = {}
    plan_step = {s["step"]: s["plan_step"] for s in c.steps}
    for u in c.units:
        if u["step"] in kept:
            by_unit.setdefault((plan_step[u["step"]], u["unit"], u["stage"]), []).append(
                (u["predicted_s"], u["measured_s"]))
    units = tuple({"plan_step": ps, "unit": uid, "stage": st, "predicted_s": v[0][0],
                   "measured_s": statistics.median(m for _, m in v),
                   "rel_err": v[0][0] / statistics.median(m for _, m in v) - 1}
                  for (ps, uid, st), v in sorted(by_unit.items()))
    by_step: dict[int, list[tuple[float, float]]] = {}
    for s in timed:
        by_step.setdefault(s["plan_step"], []).append((s["predicted_s"], s["measured_s"]))
    steps = tuple({"plan_step": ps, "predicted_s": v[0][0], "measured_s": statistics.median(m for _, m in v),
                   "rel_err": v[0][0] / statistics.median(m for _, m in v) - 1} for ps, v in sorted(by_step.items()))
    mape = lambda rows: float(np.mean([abs(r["rel_err"]) for r in rows])) if rows else float("nan")  # noqa: E731
    return Accuracy(case, role, cm.profile.fingerprint.name, mape(units), mape(steps), units, steps, len(timed),
                    c.host_slowdown)


def host_ratio(slowdown: float | None) -> str:
    return "-" if slowdown is None else f"{slowdown:.2f}"


# ---- the whole check -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Device:
    """What the phases share about the device checked: its cases and profiles."""

    kind: str  # cpu | cuda
    env: dict
    cases: list[ReplayCase]
    reference: str | None  # the device's reference profile (its cluster preset's); None: no preset names it
    model: str  # the model whose GEMM shapes the profile measures (a preset name or a model JSON path)


def _device_of(req: MachineCheckRequest, env: dict) -> _Device:
    device = req.device or env["device"]
    if device == "cuda":
        model, cluster, preset = write_gpu_specs(req.out_dir, env)
        cases = replay_cases(device, env.get("gpus", 1), str(model), str(cluster))
        d = _Device(device, env, cases, load_cluster(preset).profile if preset else None, str(model))
    else:
        d = _Device(device, env, replay_cases(device, 0, "", ""), CPU_REFERENCE, "tiny")
    if req.cases is None:
        return d
    unknown = sorted(set(req.cases) - {c.name for c in d.cases})
    if unknown:
        raise ProfileError(f"--case {unknown[0]}: not a case on {device}; choose from "
                           f"{', '.join(c.name for c in d.cases)}")
    return dataclasses.replace(d, cases=[c for c in d.cases if c.name in req.cases])


def _profile_phase(res: MachineCheck, dev: _Device, phase_s: float, say: Callable[[str], None]) -> str | None:
    """Phase 2: the profile child within phase_s; one check row per table. Returns the completed profile's path
    (profile.predict.json), None when nothing usable was measured."""
    out, logs = res.out_dir, res.out_dir / "logs"
    rows_file = out / "profile.rows.json"
    rows_file.unlink(missing_ok=True)
    t0 = time.monotonic()
    inner = max(1.0, phase_s - CHILD_START_S[dev.kind])
    code, _ = run_child(_worker("profile", "--device", dev.kind, "--out", str(rows_file), "--budget-s",
                                f"{inner:.1f}", "--model", dev.model,
                                *(["--reference", dev.reference] if dev.reference else [])),
                        phase_s, logs / "profile.log", env=_child_env(1 if dev.kind == "cpu" else None))
    multi_gpu = dev.kind == "cuda" and dev.env.get("gpus", 1) >= 2
    if dev.kind == "cuda" and not multi_gpu:
        res.checks.append(CheckRow("profile", "collective", "n/a", 0.0, "needs >= 2 GPUs"))
    if not rows_file.exists():
        res.checks.append(CheckRow("profile", "tables", "failed", time.monotonic() - t0,
                                   "timed out before its first table" if code is None else
                                   f"exit {code}: {_last_line(logs / 'profile.log')}"))
        return None
    fresh, doc = build_profile(rows_file, f"{device_kind(dev.env['description']) or dev.kind}.machine-check")
    for t, e in doc["tables"].items():
        n = len(e["rows"])
        status: Status = "failed" if e["error"] and not n else "ok" if n else "skipped"
        est = f", estimated {e['estimated_s']:.0f} s" if e.get("estimated_s") is not None else ""
        res.checks.append(CheckRow("profile", t, status, e["seconds"],
                                   f"{n}/{e['points']} points (budget {e['budget_s']:.0f} s{est})"
                                   + (": cut at its budget" if e["cut"] else "")
                                   + (f": {e['error']}" if e["error"] else "")))
    if dev.kind == "cuda":  # fp8 GEMMs are rows of the GEMM table, measured where the GPU has fp8 tensor cores
        gemm = fresh.tables["gemm"]
        n8 = int((gemm["dtype"] == "fp8").sum()) if not gemm.empty else 0
        res.checks.append(CheckRow("profile", "fp8 gemm", "ok" if n8 else "n/a", 0.0,
                                   f"{n8} fp8 (E4M3) points in the GEMM table" if n8 else
                                   f"none measured: {doc['dtype_note']} (compute capability "
                                   f"{dev.env.get('compute_capability') or 'unknown'})"))
    for t in TABLE_ORDER:
        if t not in doc["tables"] and (t != "collective" or multi_gpu):
            res.checks.append(CheckRow("profile", t, "skipped" if code is None else "failed", 0.0,
                                       "the profile phase's time ran out before it finished" if code is None else
                                       f"profile child exit {code}: {_last_line(logs / 'profile.log')}"))
    if fresh.tables["gemm"].empty:
        return None
    fresh.save(out / "profile.json")
    full = (completed_profile(fresh, load_profile(dev.reference), fresh.fingerprint.name + ".completed")
            if dev.reference else fresh)
    try:
        full.require_tables()
    except ProfileError as e:
        res.checks.append(CheckRow("profile", "cost model", "failed", 0.0, str(e)))
        return None
    spec = load_model(dev.model)
    for note in fit_models(full, {spec.name: spec}):  # T(s) fits need every table: on the completed profile
        say(f"profile: {note}")
    full.save(out / "profile.predict.json")
    return str(out / "profile.predict.json")


def _replay_phase(res: MachineCheck, dev: _Device, priced: dict[str, tuple[str | None, str | None]], steps: int,
                  seed: int, phase_s: float, say: Callable[[str], None]
                  ) -> tuple[dict[str, tuple[Plan, Path]], dict[str, Path]]:
    """Phase 3: plan every case, then replay: the --check runs first, the separate timing runs after them, each
    with the time left in phase_s (none started with less than MIN_RUN_S). Returns the plans and the traces of
    the replays that passed."""
    out = res.out_dir
    phase_end = time.monotonic() + phase_s
    plans: dict[str, tuple[Plan, Path]] = {}
    runs: list[ReplayRun] = []
    for c in dev.cases:
        ref, own = priced[c.name]
        path = out / "plans" / f"{c.name}.json"
        try:
            plans[c.name] = (make_case_plan(c, own or ref or CPU_REFERENCE, path, seed), path)
        except (PlanError, ProfileError, ValueError) as e:
            res.checks.append(CheckRow("replay", f"{c.name} plan", "failed", 0.0, str(e)))
            continue
        trace = out / "traces" / f"{c.name}.json"
        runs.append(ReplayRun(c, "check", path, None, c.plan_steps) if c.separate_timing else
                    ReplayRun(c, "check+timing", path, trace, steps))
    runs += [ReplayRun(r.case, "timing", r.plan_path, out / "traces" / f"{r.case.name}.json", steps)
             for r in list(runs) if r.kind == "check"]
    traced: dict[str, Path] = {}
    for r in runs:
        left = phase_end - time.monotonic()
        name = f"{r.case.name} {r.kind}"
        if left < MIN_RUN_S[dev.kind]:
            res.checks.append(CheckRow("replay", name, "skipped", 0.0, f"{max(left, 0):.0f} s left in the replay "
                                       f"budget, {MIN_RUN_S[dev.kind]:.0f} s needed at least"))
            continue
        say(f"replay: {name} ({r.case.ranks} rank(s), {r.case.device}, {r.case.dtype})")
        if r.trace_path is not None:
            r.trace_path.parent.mkdir(parents=True, exist_ok=True)
        log = out / "logs" / f"replay_{r.case.name}_{r.kind.replace('+', '_')}.log"
        t0 = time.monotonic()
        # CPU ranks run one thread each, as the profile measured them (a loaded CPU makes OpenMP threads spin)
        code, stdout = run_child(replay_command(r, left), left, log,
                                 env=_child_env(1 if r.case.device == "cpu" else None))
        log.with_suffix(".out").write_text(stdout)
        row = judge_replay(r, code, stdout, log, time.monotonic() - t0, left)
        res.checks.append(row)
        if row.status == "ok" and r.trace_path is not None:
            traced[r.case.name] = r.trace_path
    return plans, traced


def _compare_phase(res: MachineCheck, plans: dict[str, tuple[Plan, Path]], traced: dict[str, Path],
                   priced: dict[str, tuple[str | None, str | None]]) -> None:
    """Phase 4: every traced case on its reference and its fresh profile (in-process, a fraction of a second)."""
    for name, trace_path in traced.items():
        plan, _ = plans[name]
        trace = read_trace(trace_path)
        for role, prof in zip(("reference", "fresh"), priced[name]):
            if prof is None:
                continue
            t0 = time.monotonic()
            try:
                a = accuracy(name, role, plan, prof, trace)
            except (PlanError, ProfileError, ValueError) as e:
                res.checks.append(CheckRow("compare", f"{name} on {role}", "failed", 0.0, str(e)))
                continue
            res.accuracy.append(a)
            finite = bool(np.isfinite([a.unit_mape, a.step_mape]).all())
            res.checks.append(CheckRow("compare", f"{name} on {role}", "ok" if finite else "failed",
                                       time.monotonic() - t0, f"{a.profile}: unit MAPE {a.unit_mape:.1%} over "
                                       f"{len(a.units)} units, step MAPE {a.step_mape:.1%}"))


def machine_check(req: MachineCheckRequest, progress: Callable[[str], None] | None = None,
                  draw: Callable[[MachineCheck], list[Path]] | None = None) -> MachineCheck:
    """Run the five phases within req's budget (see the module's docstring) and write everything under
    req.out_dir. `draw(result)` (the CLI's: planner.report, which this module does not import) draws its
    predicted-vs-measured figures there and returns their paths, which summary.md lists. Raises ProfileError only
    for a request this machine cannot serve (before any phase)."""
    say = progress or (lambda _m: None)
    t_start = time.monotonic()
    load_start = os.getloadavg()[0]  # other processes' share of the machine colours every timing
    req.out_dir.mkdir(parents=True, exist_ok=True)
    say("environment: importing torch, starting the device")
    # a quarter of the budget at most (the device, hence the default budget, is known only after it)
    env = environment(req.device, req.out_dir / "logs" / "environment.log",
                      min(ENV_BUDGET_S, 0.25 * (req.budget_s or DEFAULT_BUDGET_S[req.device or "cuda"])))
    dev = _device_of(req, env)
    budget = Budget(req.budget_s or DEFAULT_BUDGET_S[dev.kind])
    budget.start = t_start
    env["load_average_start"] = load_start
    res = MachineCheck(req.out_dir, dev.kind, budget.total_s, env)
    res.checks.append(CheckRow("environment", "device", "ok", budget.elapsed_s(), environment_line(env)))
    if dev.kind == "cuda" and str(env.get("flash_attn", "")).startswith("not importable"):
        res.checks.append(CheckRow("environment", "flash-attn", "failed", 0.0, env["flash_attn"]))

    res.phase_budgets_s["profile"] = budget.phase_s("profile")
    say(f"profile: quick tables, {res.phase_budgets_s['profile']:.0f} s budget")
    predict = _profile_phase(res, dev, res.phase_budgets_s["profile"], say)

    # per case: (reference, fresh) profile of the device it runs on (on one GPU a CPU case too: no fresh one)
    priced = {c.name: (dev.reference, predict) if c.device == dev.kind else (CPU_REFERENCE, None) for c in dev.cases}
    res.phase_budgets_s["replay"] = budget.phase_s("replay")
    say(f"replay: {len(dev.cases)} plans, {res.phase_budgets_s['replay']:.0f} s budget")
    plans, traced = _replay_phase(res, dev, priced, req.steps, req.seed, res.phase_budgets_s["replay"], say)

    say("compare: predicted vs measured")
    _compare_phase(res, plans, traced, priced)

    if draw is not None and res.accuracy:
        try:
            res.figures = list(draw(res))
        except (OSError, ValueError) as e:  # a figure is a view of machine_check.json: its loss fails no check
            say(f"compare: figure not drawn: {e}")
    env["load_average_end"] = os.getloadavg()[0]
    res.elapsed_s = time.monotonic() - t_start
    atomic_write_text(req.out_dir / "machine_check.json", json.dumps(res.to_dict(), indent=1, default=str) + "\n")
    atomic_write_text(req.out_dir / "summary.md", summary_markdown(res, plans))
    return res


def environment_line(env: dict) -> str:
    v = env.get("versions", {})
    parts = [env["description"], f"torch {v.get('torch', '?')}", f"CUDA {v.get('cuda', 'none')}",
             f"NCCL {v.get('nccl', 'none')}", f"flash-attn {env.get('flash_attn', '?')}"]
    if env.get("driver"):
        parts.insert(1, f"driver {env['driver']}")
    if env.get("compute_capability"):
        parts.append(f"compute capability {env['compute_capability']}")
    if env["device"] == "cuda":
        parts.append(f"{env.get('gpus', 0)} GPU(s)")
    return ", ".join(parts)


def _pct(x: float) -> str:
    return "-" if x != x else f"{x:+.1%}"


def summary_markdown(res: MachineCheck, plans: dict[str, tuple[Plan, Path]]) -> str:
    """summary.md: environment, checks, predicted vs measured (per plan and per unit), files, next steps."""
    out = res.out_dir
    lines = [f"# meshplan machine-check: {'PASSED' if res.ok else 'FAILED'}", "",
             f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}; device {res.device}; "
             f"{res.elapsed_s:.0f} s of a {res.budget_s:.0f} s budget (phases: "
             + ", ".join(f"{k} {v:.0f} s" for k, v in res.phase_budgets_s.items()) + ").", "",
             f"Environment: {environment_line(res.environment)}. Load average (1 min) at start "
             f"{res.environment.get('load_average_start', float('nan')):.2f}, at end "
             f"{res.environment.get('load_average_end', float('nan')):.2f} ({os.cpu_count()} cores).", "",
             "## Checks", "", "| phase | check | status | seconds | detail |", "|---|---|---|---|---|"]
    lines += [f"| {c.phase} | {c.name} | {c.status} | {c.seconds:.1f} | {c.detail.replace('|', '/')} |"
              for c in res.checks]
    lines += ["", "## Predicted vs measured", "",
              "Error = predicted / measured - 1; MAPE = mean |error|. Units: median over the timed iterations (the "
              "first replay of each plan step is left out as warm-up: a GPU's first pass over new shapes is seconds "
              "slower); steps: median step time per plan step. Host probe: its time around the replay over its time "
              "while the profile was measured (CPU; 1: the host computed as fast).", "",
              "| plan | profile | role | units | unit MAPE | step MAPE | step predicted (ms) | step measured (ms) | "
              "host probe x |", "|---|---|---|---|---|---|---|---|---|"]
    for a in res.accuracy:
        pred = "/".join(f"{s['predicted_s'] * 1e3:.1f}" for s in a.steps)
        meas = "/".join(f"{s['measured_s'] * 1e3:.1f}" for s in a.steps)
        lines.append(f"| {a.case} | {a.profile} | {a.role} | {len(a.units)} | {a.unit_mape:.1%} | {a.step_mape:.1%} "
                     f"| {pred} | {meas} | {host_ratio(a.host_slowdown)} |")
    for a in res.accuracy:
        lines += ["", f"### {a.case} on {a.profile} ({a.role})", "",
                  "| plan step | unit | stage | predicted (ms) | measured (ms) | error |", "|---|---|---|---|---|---|"]
        lines += [f"| {u['plan_step']} | {u['unit']} | {u['stage']} | {u['predicted_s'] * 1e3:.2f} | "
                  f"{u['measured_s'] * 1e3:.2f} | {_pct(u['rel_err'])} |" for u in a.units]
    traced = sorted((out / "traces").glob("*.json")) if (out / "traces").is_dir() else []
    pairs = [f"{plans[t.stem][1]}:{t}" for t in traced if t.stem in plans and not t.name.endswith(".chrome.json")]
    lines += ["", "## Files", "", "- profile.json: the fresh profile (measured tables only); profile.predict.json: "
              "the same completed with the reference's tables it lacks (what 'fresh' predictions use); "
              "profile.rows.json: the profile child's rows, budgets and cuts per table",
              "- plans/: the replayed plans; traces/: measured traces (+ .chrome.json); logs/: every child's output",
              "- machine_check.json: all of the above as data"]
    lines += [f"- {f.name}: predicted against measured, per unit and per step, each plan on each profile"
              for f in res.figures]
    if len(pairs) >= 2 and (out / "profile.predict.json").exists():
        lines += ["", "Fit the fresh profile to these traces:", "",
                  f"    meshplan calibrate {' '.join(pairs)} --profile {out / 'profile.predict.json'} "
                  f"--out {out / 'profile.calibrated.json'}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """The children: `env` (prints one JSON line) and `profile` (writes the rows file)."""
    p = argparse.ArgumentParser(prog="python -m planner.studies.machine_check")
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("env")
    e.add_argument("--device", choices=("cpu", "cuda"))
    q = sub.add_parser("profile")
    q.add_argument("--device", choices=("cpu", "cuda"), required=True)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--budget-s", type=float, required=True)
    q.add_argument("--model", required=True)
    q.add_argument("--reference")
    a = p.parse_args(argv)
    if a.what == "env":
        return _env_worker(a.device)
    return _profile_worker(a.device, a.out, a.budget_s, a.model, a.reference)


if __name__ == "__main__":
    sys.exit(main())

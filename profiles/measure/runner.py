"""Orchestration of `meshplan profile`: plan the points, run each table's micro-benchmark
(reporting progress to the caller), and write one fingerprinted Profile.

Resumable: `<out>.partial` (written atomically) holds the plan being measured, each finished table,
and the rows of the table in progress (saved every few seconds and on Ctrl-C; the collective table,
one torchrun job, and the memory table, whose rows are minima over passes across all its sizes, only
when finished). A rerun of the same command (same plan, same device) skips
what it holds. Only a complete profile is ever written to <out> (atomically); the partial file is
then removed.

torch is imported only when measuring, so `compare_profiles` and the planning helpers work without
it (the CLI's `--compare` runs on a laptop)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from profiles.measure import (DTYPE_PREFERENCE, TABLES, MeasureConfig, MeasureError, attention_points,
                              available_memory_bytes, collective_cases, cores_constant, gemm_points, host_copy_points,
                              memory_points, plan_config, worker_env)
from profiles.measure.hostload import load_constant, node_cpu_s, other_cores, own_cpu_s
from profiles.measure.probe import host_probe_s, probe_constant
from profiles.table import Fingerprint, Profile, ProfileError, atomic_write_text, attention_flops

BF16_SANE_FRACTION = 0.25  # profile bf16 on CPU only if it reaches this fraction of the fp32 rate
CHECKPOINT_EVERY_S = 5.0  # the rows of the table being measured reach the partial file at least this often


@dataclass(frozen=True)
class ProfileRequest:
    """What the user asked `meshplan profile` for."""

    out: Path  # output profile JSON
    quick: bool = False  # small grids, few repeats
    ops: tuple[str, ...] = TABLES  # tables to measure
    max_bytes: int | None = None  # cap on collective, host-copy and memory-kernel sizes
    nproc: int | None = None  # collective ranks (default: GPUs, or 4 on CPU like the local-cpu preset)
    model_shapes: tuple[tuple[str, int, int], ...] = ()  # (label, n, k) GEMM shapes of --models
    model_head_dims: tuple[int, ...] = ()  # attention head dims of --models (64 and 128 are always measured)
    device: str | None = None  # "cpu" / "cuda"; default: cuda when available

    def __post_init__(self) -> None:
        bad = [o for o in self.ops if o not in TABLES]
        if bad or not self.ops:
            raise MeasureError(f"--ops: unknown table(s) {bad or '(none given)'}; choose from {','.join(TABLES)}")
        if self.max_bytes is not None and self.max_bytes < 1024:
            raise MeasureError(f"--max-bytes must be at least 1024, got {self.max_bytes}")
        if self.nproc is not None and self.nproc < 1:
            raise MeasureError(f"--nproc must be at least 1, got {self.nproc}")
        if self.device not in (None, "cpu", "cuda"):
            raise MeasureError(f"--device must be cpu or cuda, got {self.device!r}")


@dataclass
class RunResult:
    profile: Profile
    seconds: dict[str, float]  # measuring time per table (0 for resumed ones)
    resumed: list[str] = field(default_factory=list)  # tables taken from the partial file
    total_s: float = 0.0


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def profile_name(out: Path) -> str:
    return out.name[:-5] if out.name.endswith(".json") else out.name


# ---- partial file ---------------------------------------------------------------------------

@dataclass
class PartialState:
    """What an interrupted run left: finished tables and the rows of the table it was measuring."""

    plan: dict  # MeasureConfig.key(): a resumed run measures the points the first run chose
    dtype_note: str  # how the dtypes were chosen (the probe is not rerun on resume)
    tables: dict = field(default_factory=dict)  # table -> _df_to_json(...)
    table: str = ""  # the table in progress ("" when none)
    rows: list = field(default_factory=list)  # its measured rows, in point order

    def rows_of(self, name: str) -> list:
        return list(self.rows) if name == self.table else []


def _load_partial(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # torn by a crash mid-write is impossible (atomic), but never trust it blindly
    return d if isinstance(d, dict) else None


def _read_partial(path: Path, key: dict) -> PartialState | None:
    """What an earlier run of the same command on the same device left; None when there is no such
    file, or it was made by another command or device (then everything is measured afresh)."""
    d = _load_partial(path) if path.exists() else None
    if d is None or d.get("key") != key or not isinstance(d.get("plan"), dict):
        return None
    try:
        MeasureConfig.from_key(d["plan"])
    except MeasureError:
        return None
    prog = d.get("in_progress") or {}
    return PartialState(plan=d["plan"], dtype_note=str(d.get("dtype_note", "")), tables=dict(d.get("tables") or {}),
                        table=str(prog.get("table", "")), rows=list(prog.get("rows") or []))


def _write_partial(path: Path, key: dict, state: PartialState) -> None:
    d = {"key": key, "plan": state.plan, "dtype_note": state.dtype_note, "tables": state.tables}
    if state.table:
        d["in_progress"] = {"table": state.table, "rows": state.rows}
    atomic_write_text(path, json.dumps(d, sort_keys=True) + "\n")


def resume_hint(out: Path) -> str:
    """One line for a run stopped by Ctrl-C: what its partial file holds and how to go on."""
    ppath = partial_path(out)
    d = _load_partial(ppath) if ppath.exists() else None
    if d is None:
        return f"interrupted before anything was measured; {out} not written"
    saved = [t for t in TABLES if t in (d.get("tables") or {})]
    prog = d.get("in_progress") or {}
    if prog.get("rows"):
        saved.append(f"{len(prog['rows'])} {prog.get('table')} point(s)")
    return (f"interrupted; {out} not written; {ppath} holds {', '.join(saved) or 'the plan only'}: "
            "rerun the same command to resume")


class _Checkpoint:
    """Keeps the partial file up to date with the table being measured: every CHECKPOINT_EVERY_S,
    and at once on `flush` (Ctrl-C), so an interrupt loses at most the point in progress."""

    def __init__(self, path: Path, key: dict, state: PartialState, table: str) -> None:
        self.path, self.key, self.state = path, key, state
        state.rows = state.rows_of(table)
        state.table = table
        self.last_s = time.monotonic()

    def add(self, row: tuple) -> None:
        self.state.rows.append([_py(v) for v in row])
        if time.monotonic() - self.last_s >= CHECKPOINT_EVERY_S:
            self.flush()

    def flush(self) -> None:
        _write_partial(self.path, self.key, self.state)
        self.last_s = time.monotonic()

    def finish(self, df: pd.DataFrame, seconds: float, load_start: float) -> None:
        self.state.tables[self.state.table] = {**_df_to_json(df, seconds), "load_start": load_start}
        self.state.table, self.state.rows = "", []
        self.flush()  # a crash after this line loses no finished table


def _df_to_json(df: pd.DataFrame, seconds: float) -> dict:
    return {"columns": list(df.columns), "rows": [[_py(v) for v in r] for r in df.itertuples(index=False)],
            "seconds": seconds}


def _py(v):
    return v.item() if isinstance(v, np.generic) else v


def _json_to_df(t: dict) -> pd.DataFrame:
    return pd.DataFrame(t["rows"], columns=t["columns"])


# ---- device and plan ------------------------------------------------------------------------

def detect_device() -> str:
    try:
        import torch
    except ImportError:
        raise MeasureError("measuring needs torch: pip install torch (or the `runtime` extra)") from None
    return "cuda" if torch.cuda.is_available() else "cpu"


def choose_dtypes(device: str) -> tuple[tuple[str, ...], str]:
    """(dtypes to profile, main dtype first, and a note). GPUs: bf16, fp16, fp32. CPUs: fp32 alone, or
    bf16 then fp32 when a probe GEMM shows bf16 runs at a sane speed (CPUs without native bf16 emulate
    it ~100x slower). The main dtype is the one attention is measured in, so it must be the one the
    cost model looks up (`main_dtype`: bf16 whenever the GEMM table holds it)."""
    from profiles.measure.gemm import dtype_rate_flops, fp8_supported
    if device == "cuda":
        if fp8_supported(device):
            return ("bf16", "fp16", "fp32", "fp8"), "GEMM dtypes bf16, fp16, fp32 (fp32 without TF32), fp8 (E4M3)"
        return ("bf16", "fp16", "fp32"), ("GEMM dtypes bf16, fp16, fp32 (fp32 without TF32); no fp8 (needs "
                                          "torch._scaled_mm and compute capability 8.9+)")
    fp32, bf16 = dtype_rate_flops("fp32", device), dtype_rate_flops("bf16", device)
    note = (f"CPU probe 512^3 GEMM: fp32 {fp32 / 1e9:.1f} GFLOP/s, bf16 {bf16 / 1e9:.1f} GFLOP/s; fp8 GEMMs are "
            "measured on GPUs only")
    if bf16 >= BF16_SANE_FRACTION * fp32:
        return ("bf16", "fp32"), note + "; both profiled (attention too), bf16 the main dtype (peak)"
    return ("fp32",), note + f"; bf16 below {BF16_SANE_FRACTION:.0%} of fp32, not profiled"


def build_config(req: ProfileRequest, device: str, dtypes: tuple[str, ...]) -> MeasureConfig:
    if device == "cuda":
        import torch
        nproc = req.nproc or torch.cuda.device_count()
        mem_cap = torch.cuda.mem_get_info()[0] // 4  # input, output and ring temporaries per GPU
    else:
        nproc = req.nproc or 4
        avail = available_memory_bytes()
        mem_cap = avail // (4 * max(nproc, 1)) if avail else None
    return plan_config(device, quick=req.quick, nproc=nproc, max_bytes=req.max_bytes,
                       model_shapes=req.model_shapes, dtypes=dtypes, mem_cap_bytes=mem_cap,
                       model_head_dims=req.model_head_dims)


def plan_counts(cfg: MeasureConfig) -> dict[str, int]:
    return {"gemm": len(gemm_points(cfg)), "attention": len(attention_points(cfg)),
            "collective": len(collective_cases(cfg, cfg.nproc)), "host_copy": len(host_copy_points(cfg)),
            "memory": len(memory_points(cfg))}


# ---- measuring --------------------------------------------------------------------------------

def run_collectives(cfg: MeasureConfig, ops: tuple[str, ...] | None = None,
                    on_progress: Callable[[int, int], None] | None = None, check: bool = False) -> pd.DataFrame:
    """Launch the torchrun worker with cfg.nproc ranks and read its rows back."""
    if cfg.nproc < 2:
        raise MeasureError("the collective table needs --nproc >= 2")
    with tempfile.TemporaryDirectory(prefix="meshplan-coll-") as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(cfg.nproc),
               "-m", "profiles.measure.collectives", "--out", str(out), "--max-bytes", str(cfg.coll_sizes[-1])]
        if cfg.quick:
            cmd.append("--quick")
        if ops:
            cmd += ["--ops", ",".join(ops)]
        if check:
            cmd.append("--check")
        env = worker_env()
        from profiles.measure.collectives import PROGRESS_TAG
        with open(Path(tmp) / "stderr.txt", "w+") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    if line.startswith(PROGRESS_TAG) and on_progress:
                        done, total = line.split()[1:3]
                        on_progress(int(done), int(total))
                rc = proc.wait()
            except BaseException:  # Ctrl-C reached this process alone (kill -INT): leave no workers behind
                _stop(proc)
                raise
            err.seek(0)
            log = err.read()
        if rc != 0 or not out.exists():
            raise MeasureError(f"collective worker failed (exit {rc}): {_last_error(log)}; rerun with "
                               f"`{' '.join(cmd[1:])}` to see its log")
        d = json.loads(out.read_text())
    return pd.DataFrame(d["rows"], columns=d["columns"])


def _stop(proc: subprocess.Popen) -> None:
    """Terminate torchrun (it stops its workers on SIGTERM), then kill it if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _last_error(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error:" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def measure_table(name: str, cfg: MeasureConfig, tick: Callable[[int, int], None],
                  rows_done: list | None = None, on_row: Callable[[tuple], None] | None = None) -> pd.DataFrame:
    """Run one table's benchmark; tick(done, total) after each point. The points whose rows an
    interrupted run measured (rows_done, in point order) are not measured again; on_row gets each new
    row. The collective table runs as one torchrun job and always starts afresh."""
    rows_done = rows_done or []
    if name == "collective":
        return run_collectives(cfg, on_progress=tick)
    if name == "memory":
        return _measure_memory(cfg, tick, rows_done, on_row)
    if name == "gemm":
        from profiles.measure.gemm import measure_gemm as fn
        pts = gemm_points(cfg)
    elif name == "attention":
        from profiles.measure.attention import measure_attention as fn
        pts = attention_points(cfg)
    else:
        from profiles.measure.host_copy import measure_host_copy as fn
        pts = host_copy_points(cfg)
    todo = pts[len(rows_done):]
    # rows come once final (after the last pass): progress counts points by the fraction of timings made
    new = fn(cfg, todo, on_row, lambda f: tick(len(rows_done) + int(f * len(todo)), len(pts)))
    return _with_done(rows_done, new)


def _with_done(rows_done: list, new: pd.DataFrame) -> pd.DataFrame:
    if not rows_done:
        return new
    return pd.DataFrame([list(r) for r in rows_done] + [list(r) for r in new.itertuples(index=False)],
                        columns=new.columns)


def _measure_memory(cfg: MeasureConfig, tick: Callable[[int, int], None], rows_done: list,
                    on_row: Callable[[tuple], None] | None) -> pd.DataFrame:
    """The memory table: its rows come only at the end (minima over passes across all sizes), so
    progress counts points by the fraction of calls made."""
    from profiles.measure.memory import measure_memory
    pts = memory_points(cfg)
    todo = pts[len(rows_done):]
    new = measure_memory(cfg, todo, on_point=on_row,
                         on_progress=lambda f: tick(len(rows_done) + int(f * len(todo)), len(pts)))
    return _with_done(rows_done, new)


def memory_note(cfg: MeasureConfig, load_start: float | None) -> str:
    """How the memory table was measured, for the fingerprint notes."""
    t = cfg.mem_timing
    sizes = cfg.mem_sizes
    return (f"Memory: y = x + 1 out of place (torch.add) in {cfg.main_dtype}, bytes = read + written, "
            f"{sizes[0]}..{sizes[-1]} bytes (x2 grid); time = minimum over {cfg.mem_rounds} passes interleaved "
            f"across sizes ({t.warmup} warm-up + {t.min_repeats}..{t.repeats} timed calls per size per pass"
            + (", L2 flushed below twice its size" if cfg.device == "cuda" else
               ", operands cycled through buffers spanning twice the L3") + "), median in median_s"
            + (f"; load average at its start {load_start:.2f}." if load_start is not None else "."))


def merge_tables(base: Profile, measured: Profile, names: tuple[str, ...], note: str) -> Profile:
    """`base` with tables `names` taken from `measured` (e.g. `meshplan profile --ops memory` run later on
    the same device): every other table, constant, fit and fingerprint field kept, the notes extended with
    `note`. Save the result with Profile.save, which recomputes the sha256."""
    bad = [n for n in names if n not in TABLES]
    if bad or not names:
        raise MeasureError(f"merge_tables: unknown table(s) {bad or '(none given)'}; choose from {','.join(TABLES)}")
    empty = [n for n in names if measured.tables[n].empty]
    if empty:
        raise MeasureError(f"merge_tables: {measured.fingerprint.name!r} has no rows in {', '.join(empty)}")
    if base.fingerprint.device != measured.fingerprint.device:
        raise MeasureError(f"merge_tables: devices differ ({base.fingerprint.device!r} vs "
                           f"{measured.fingerprint.device!r}); measure all tables on one device")
    tables = {**{k: v.copy() for k, v in base.tables.items()}, **{n: measured.tables[n].copy() for n in names}}
    fp = dataclasses.replace(base.fingerprint, notes=f"{base.fingerprint.notes} {note}".strip(), sha256="")
    constants = copy.deepcopy(base.constants)
    if "memory" in names:  # the kinds' ratios belong to the memory table they were measured against
        constants.update({k: copy.deepcopy(v) for k, v in measured.constants.items() if k.startswith("memory_kind_")})
    return Profile(fingerprint=fp, tables=tables, constants=constants, fits=copy.deepcopy(base.fits))


def peak_constant(gemm: pd.DataFrame, dtype: str, device: str) -> dict:
    """The best achieved GEMM rate of the main dtype: on a measured profile it stands in for the
    datasheet peak so that MFU is defined (on CPU there is no bf16 peak to quote)."""
    g = gemm[gemm["dtype"] == dtype]
    rate = 2.0 * g["m"] * g["n"] * g["k"] / g["time_s"]
    best = g.loc[rate.idxmax()]
    return {"value": float(rate.max()), "unit": "FLOP/s",
            "source": f"measured: best achieved {dtype} GEMM rate on this {device} "
                      f"(m,n,k = {int(best.m)},{int(best.n)},{int(best.k)}), not a datasheet peak"}


# progress(table, points done, points in the table, resumed): once per table before measuring, then
# after each measured point; the caller draws it (the CLI: a rich bar per table).
Progress = Callable[[str, int, int, bool], None]


def run_profile(req: ProfileRequest, *, post: Callable[[Profile], None] | None = None,
                on_note: Callable[[str], None] | None = None, progress: Progress | None = None) -> RunResult:
    """Measure the requested tables (resuming finished ones), build the Profile, let `post` add fits,
    write it atomically to req.out and remove the partial file. `on_note` gets one-line notes (resumed,
    stale partial file); `progress` sees every table's count of points."""
    t_start = time.perf_counter()
    device = req.device or detect_device()
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        raise MeasureError("--device cuda: torch sees no CUDA device here (torch "
                           f"{torch.__version__}); leave --device out to profile the CPU")
    threads0 = torch.get_num_threads()
    try:
        return _run_profile(req, device, t_start, post, on_note or (lambda _: None),
                            progress or (lambda *_: None))
    finally:
        torch.set_num_threads(threads0)


def _run_profile(req: ProfileRequest, device: str, t_start: float, post, on_note: Callable[[str], None],
                 progress: Progress) -> RunResult:
    import torch
    if device == "cpu":
        torch.set_num_threads(1)  # = plan_config's cpu_threads; set before the dtype probe
    from profiles.measure import device_fingerprint
    desc, versions = device_fingerprint(device)
    key = {"device": desc, "versions": {k: versions.get(k, "") for k in ("torch", "cuda", "nccl", "gpus")},
           "request": {"quick": req.quick, "ops": list(req.ops), "max_bytes": req.max_bytes, "nproc": req.nproc,
                       "model_shapes": [list(s) for s in req.model_shapes]}}
    ppath = partial_path(req.out)
    state = _read_partial(ppath, key)
    if state is None:
        if ppath.exists():
            on_note(f"{ppath} was left by another command or device; measuring afresh")
        dtypes, dtype_note = choose_dtypes(device)
        state = PartialState(plan=build_config(req, device, dtypes).key(), dtype_note=dtype_note)
    else:
        on_note(f"resuming from {ppath}")
    cfg = MeasureConfig.from_key(state.plan)
    dtype_note = state.dtype_note
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
        versions["torch_threads"] = str(cfg.cpu_threads)
    if "collective" in req.ops and cfg.nproc < 2:
        raise MeasureError("the collective table needs --nproc >= 2 (or leave it out of --ops)")
    _write_partial(ppath, key, state)  # from here on an interrupted run always leaves one
    done = state.tables
    load0 = os.getloadavg()
    # CPU: how fast the host computes while the tables are measured, before and after them (a replay records the
    # same probe: `meshplan simulate --measured` compares the two; profiles/measure/probe.py)
    probe_before_s = host_probe_s() if device == "cpu" else None
    # CPU: other processes' load over the run (the tables are timed under it; hostload.py)
    node0, own0, wall0 = (node_cpu_s(), own_cpu_s(), time.perf_counter()) if device == "cpu" else (None, 0.0, 0.0)
    counts = plan_counts(cfg)
    seconds: dict[str, float] = {}
    resumed = [t for t in TABLES if t in req.ops and t in done]

    for t in TABLES:
        if t in req.ops:
            progress(t, counts[t] if t in done else len(state.rows_of(t)), counts[t] or 1, t in done)
    for name in TABLES:
        if name not in req.ops or name in done:
            continue
        t0, load_start = time.perf_counter(), os.getloadavg()[0]
        ckpt = _Checkpoint(ppath, key, state, name)
        try:
            df = measure_table(name, cfg, lambda d, n, _t=name: progress(_t, d, n, False),
                               rows_done=list(state.rows), on_row=ckpt.add)
        except KeyboardInterrupt:
            ckpt.flush()  # keep every point measured so far
            raise
        seconds[name] = time.perf_counter() - t0
        ckpt.finish(df, seconds[name], load_start)

    tables = {name: _json_to_df(done[name]) for name in TABLES if name in done and name in req.ops}
    for name in resumed:
        seconds[name] = 0.0
    constants = {}
    if "gemm" in tables and len(tables["gemm"]):
        constants["peak_bf16_flops"] = peak_constant(tables["gemm"], cfg.main_dtype, device)
        constants["gemm_large_flops"] = dict(constants["peak_bf16_flops"])
    if device == "cpu" and {"gemm", "attention"} & set(req.ops):  # ranks share the cores: CostModel.compute_share
        from profiles.measure.concurrency import SOURCE, measure_concurrency
        constants["cores_per_node"] = cores_constant()
        for name, value in measure_concurrency(constants["cores_per_node"]["value"]).items():
            constants[name] = {"value": value, "unit": "x", "source": SOURCE}
    if device == "cpu" and "collective" in tables:  # a blocking meeting on busy cores (CostModel.wake)
        from profiles.measure import wake
        cores = (constants.get("cores_per_node") or cores_constant())["value"]
        table = Profile(Fingerprint("collectives", desc, "measured", ""), {"collective": tables["collective"]})
        transfer_s = float(table.collective_time_s("send_recv", wake.MESSAGE_BYTES, 2))  # what a meeting is charged
        constants.update(wake.wake_constants(wake.measure_meetings_s(cores), transfer_s))
    if "memory" in tables and len(tables["memory"]):  # how far each elementwise kind is from the table's kernel
        from profiles.measure.memory import memory_kind_constants
        constants.update(memory_kind_constants(device, cfg.main_dtype, req.max_bytes))
    if probe_before_s is not None:
        constants["host_probe_s"] = probe_constant(probe_before_s, host_probe_s())
    if node0 is not None and (node1 := node_cpu_s()) is not None:
        wall = time.perf_counter() - wall0
        constants["host_other_cores"] = load_constant(other_cores(node1[0] - node0[0], own_cpu_s() - own0, wall),
                                                      (node1[1] - node0[1]) / wall, wall)
    measured_s = {n: round(float(done[n].get("seconds", 0.0)), 1) for n in tables}
    notes = (f"meshplan profile ({'quick' if cfg.quick else 'full'}), main dtype {cfg.main_dtype}. {dtype_note}. "
             f"Timing: warm-up {cfg.timing.warmup}, up to {cfg.timing.repeats} repeats (min {cfg.timing.min_repeats}, "
             f"{cfg.timing.budget_s:g} s per point), median"
             + (f"; GEMM, attention and host copy in {cfg.passes} interleaved passes, the fastest pass's median"
                if cfg.passes > 1 else "") + "; "
             + ("CUDA events after an L2 flush. " if device == "cuda" else
                f"time.perf_counter, {cfg.cpu_threads} torch thread(s): per-rank compute as under torchrun; GEMM "
                "operands cycled through copies spanning twice the L3 (read from memory, as in a step). ")
             + f"Attention: heads {cfg.attn_heads[0]}/{cfg.attn_heads[1]} (q/kv), causal (varlen also "
             f"non-causal), {cfg.attn_pack_tokens} tokens per varlen call; extra columns layout/impl say how each "
             "row ran. "
             f"Collectives: {cfg.nproc} ranks ({'nccl' if device == 'cuda' else 'gloo'}), world group only, "
             "native ops when the group is the world, P2P rings on subsets (impl column); time = max over ranks, "
             "mean over repeats; cpu_s = a member's process CPU per call, mean over repeats and members. "
             + ("Host copy: memcpy (torch copy_ between host buffers), no device on this machine. "
                if device == "cpu" else "Host copy: pinned and pageable H2D/D2H. ")
             + (memory_note(cfg, done["memory"].get("load_start")) + " " if "memory" in tables else "")
             + f"Seconds per table: {measured_s}. Load average at start {load0[0]:.2f}, at end "
             f"{os.getloadavg()[0]:.2f} (other processes share the machine when it is above its core count).")
    fp = Fingerprint(name=profile_name(req.out), device=desc, source="measured",
                     created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     versions=versions, notes=notes)
    prof = Profile(fingerprint=fp, tables=tables, constants=constants)
    if post:
        post(prof)
    prof.save(req.out)
    ppath.unlink(missing_ok=True)
    return RunResult(profile=prof, seconds=seconds, resumed=resumed, total_s=time.perf_counter() - t_start)


def main_dtype(profile: Profile) -> str:
    """The dtype a training spec should use on this profile: bf16 where measured, else fp32."""
    dts = set(profile.tables["gemm"]["dtype"])
    for dt in DTYPE_PREFERENCE:
        if dt in dts:
            return dt
    raise ProfileError(f"profile {profile.fingerprint.name!r} has no GEMM table")


# ---- run-time estimate ------------------------------------------------------------------------------

# Costs no table row shows. [assumption] unless a source is named; they are small next to the rows.
EST_CALL_OVERHEAD_S = {"cpu": 20e-6, "cuda": 60e-6}  # Python + timer per call; GPU: L2-flush memset + event sync
EST_BARRIER_S = {"cpu": 5e-4, "cuda": 5e-5}  # the untimed barrier before each collective repeat
EST_FILL_BYTES_PER_S = {"cpu": 1e9, "cuda": 1e12}  # allocating + filling a case's ~3 S bytes of buffers per rank
EST_FIXED_S = {"cpu": {"startup": 5.0, "torchrun": 8.0,  # imports, dtype probe; torchrun + gloo rendezvous
                       "concurrency": 20.0,  # the cores' slowdown: 2c probe processes, 27 rounds of 1, c, 2c
                       "wake": 95.0},  # a meeting on busy cores: torchrun on 2c and c ranks, 72 rounds of 2 x 3 runs
               "cuda": {"startup": 20.0,  # CUDA context, cuBLAS/flash init, autotune warm-ups
                        "torchrun": 40.0}}  # NCCL init ~4.5 s per group + ~0.2 s per P2P pair (REFERENCE 8.4)
# A reference profile may hold only bf16 GEMMs: time of other dtypes relative to bf16.
# H100 SXM dense bf16 989 vs fp32 67 and fp8 1,979 TFLOP/s [spec]
DTYPE_VS_BF16 = {"bf16": 1.0, "fp16": 1.0, "fp32": 989 / 67, "fp8": 989 / 1979}


def estimate_request(req: ProfileRequest, ref: Profile) -> tuple[MeasureConfig, dict[str, float]]:
    """The plan `meshplan profile` would run for req on req.device (default cpu; cuda: 8 GPUs unless
    --nproc), without torch or the machine, and its estimated seconds (tables not in --ops are 0)."""
    device = req.device or "cpu"
    if device not in ("cpu", "cuda"):
        raise MeasureError(f"--device must be cpu or cuda, got {device!r}")
    cfg = plan_config(device, quick=req.quick, nproc=req.nproc or (8 if device == "cuda" else 4),
                      max_bytes=req.max_bytes, model_shapes=req.model_shapes, model_head_dims=req.model_head_dims)
    est = estimate_seconds(cfg, ref)
    return cfg, {k: (v if k == "fixed" or k in req.ops else 0.0) for k, v in est.items()}


def estimate_seconds(cfg: MeasureConfig, ref: Profile) -> dict[str, float]:
    """Seconds a run of plan `cfg` should take, per table plus 'fixed', from the times in a reference
    profile of the same device (e.g. an analytic GPU profile): every point's warm-up and repeat
    calls at the reference time plus per-call overhead. Torch-free."""
    dev = cfg.device
    over = EST_CALL_OVERHEAD_S[dev]
    ref_dtypes = set(ref.tables["gemm"]["dtype"])

    def calls(t: float, timing) -> float:
        return (timing.warmup + timing.repeats_for(t)) * (t + over)

    def ref_dtype(dt: str) -> tuple[str, float]:
        if dt in ref_dtypes:
            return dt, 1.0
        base = main_dtype(ref)
        return base, DTYPE_VS_BF16.get(dt, 1.0) / DTYPE_VS_BF16.get(base, 1.0)

    est = {"fixed": EST_FIXED_S[dev]["startup"] + EST_FIXED_S[dev].get("concurrency", 0.0)}
    t = 0.0
    for p in gemm_points(cfg):
        dt, f = ref_dtype(p.dtype)
        t += cfg.passes * calls(float(ref.gemm_time_s(p.m, p.n, p.k, dt)) * f, cfg.timing)
    est["gemm"] = t
    t = 0.0
    for p in attention_points(cfg):
        dt, f = ref_dtype(p.dtype)
        one = float(ref.attention_time_s(p.doc_len, heads=p.heads, head_dim=p.head_dim, causal=p.causal,
                                         direction=p.direction, dtype=dt)) * f
        work = p.docs * (p.docs if p.layout == "docmask" else 1)  # a document mask does T^2 work
        t += cfg.passes * (calls(one * work, cfg.timing)
                           + (calls(one, cfg.timing) if p.direction == "bwd" else 0.0))  # + fwd in setup
    est["attention"] = t
    t = 0.0
    if cfg.nproc >= 2:
        for c in collective_cases(cfg, cfg.nproc):
            from profiles.measure import collective_timing
            one = float(ref.collective_time_s(c.op, c.nbytes, c.group_size))
            tm = collective_timing(cfg, c.nbytes)
            t += (tm.warmup + tm.repeats) * (one + over + EST_BARRIER_S[dev]) + 3 * c.nbytes / EST_FILL_BYTES_PER_S[dev]
        t += EST_FIXED_S[dev]["torchrun"]
    est["collective"] = t + EST_FIXED_S[dev].get("wake", 0.0)  # measured with the collective table (CPU)
    t = 0.0
    for p in host_copy_points(cfg):
        direction = p.direction if (ref.tables["host_copy"]["direction"] == p.direction).any() else "memcpy"
        t += cfg.passes * calls(float(ref.host_copy_time_s(p.nbytes, direction, p.pinned)), cfg.timing)
    est["host_copy"] = t
    mem = ref.tables["memory"]
    t = 0.0
    for p in memory_points(cfg):
        # A reference saved before the memory table existed: a copy moves half the bytes (read + write).
        one = float(ref.memory_time_s(p.nbytes) if len(mem) else
                    ref.host_copy_time_s(p.nbytes / 2, str(ref.tables["host_copy"]["direction"].iloc[0]), False))
        t += cfg.mem_rounds * calls(one, cfg.mem_timing)
    est["memory"] = t
    return est


# ---- comparison ---------------------------------------------------------------------------------

# Keys to align rows on, the keys dropped one by one when nothing aligns (so a CPU fp32 profile still
# compares with a bf16 GPU one), the x-axis of the summary, and the summary grouping.
_CMP = {
    "gemm": (["m", "n", "k", "dtype"], ["dtype"], "flops", ["dtype"]),
    "attention": (["direction", "causal", "head_dim", "doc_len", "dtype"], ["dtype", "causal"], "doc_len",
                  ["direction", "causal", "head_dim"]),
    "collective": (["op", "scope", "group_size", "concurrent_groups", "bytes"], ["scope"], "bytes",
                   ["op", "group_size", "concurrent_groups"]),
    "host_copy": (["direction", "pinned", "bytes"], ["pinned", "direction"], "bytes", ["direction", "pinned"]),
    "memory": (["bytes"], [], "bytes", []),
}


@dataclass
class TableComparison:
    table: str
    rows: pd.DataFrame  # aligned keys, value_a, value_b, ratio (A/B)
    summary: pd.DataFrame  # per group: n, geomean, min, max, ratio at the smallest and largest x
    quantity: str  # what value_a / value_b are
    note: str = ""  # keys dropped, or why nothing aligned


def _comparable(table: str, df: pd.DataFrame) -> pd.DataFrame:
    """Rows with a comparable value: time, or for attention seconds per FLOP (profiles measure
    different head counts and documents per call) on the rows the cost model looks up."""
    df = df.copy()
    if table == "attention":
        if "layout" in df.columns:
            df = df[df["layout"].isna() | (df["layout"] == "varlen")]
        fl = np.array([float(attention_flops(r.doc_len, r.heads, r.head_dim, bool(r.causal), r.direction))
                       for r in df.itertuples()]) * df["docs"].to_numpy(float)
        df["value"] = df["time_s"].to_numpy(float) / fl if len(df) else []
    else:
        df["value"] = df["time_s"].astype(float)
    if table == "gemm":
        df["flops"] = 2.0 * df["m"] * df["n"] * df["k"]
    return df


def compare_constants(a: Profile, b: Profile) -> pd.DataFrame:
    """The profiles' numeric constants side by side (peak rates, core-share slowdowns, elementwise kinds, fitted
    overheads): constant, unit, a, b and A/B; NaN where one profile lacks it."""
    rows = []
    for name in sorted(set(a.constants) | set(b.constants)):
        va, vb = (p.constants.get(name, {}).get("value") for p in (a, b))
        va, vb = (float(v) if isinstance(v, (int, float)) else np.nan for v in (va, vb))
        unit = (a.constants.get(name) or b.constants.get(name)).get("unit", "")
        rows.append({"constant": name, "unit": unit, "a": va, "b": vb, "ratio": va / vb if vb else np.nan})
    return pd.DataFrame(rows, columns=["constant", "unit", "a", "b", "ratio"])


def compare_profiles(a: Profile, b: Profile) -> list[TableComparison]:
    """Ratios A/B table by table, aligned on common keys (medians where a key repeats)."""
    out = []
    for table in TABLES:
        keys, soft, x, group = _CMP[table]
        qty = "s per FLOP" if table == "attention" else "time_s"
        da, db = _comparable(table, a.tables[table]), _comparable(table, b.tables[table])
        if da.empty or db.empty:
            out.append(TableComparison(table, pd.DataFrame(), pd.DataFrame(), qty,
                                       f"{'A' if da.empty else 'B'} has no {table} rows"))
            continue
        use, dropped, merged = list(keys), [], pd.DataFrame()
        for drop in [None] + soft:
            if drop:
                use.remove(drop)
                dropped.append(drop)
            ga = da.groupby(use, as_index=False)["value"].median()
            gb = db.groupby(use, as_index=False)["value"].median()
            merged = ga.merge(gb, on=use, suffixes=("_a", "_b"))
            if len(merged):
                break
        if merged.empty:
            out.append(TableComparison(table, merged, pd.DataFrame(), qty, "no common keys"))
            continue
        merged["ratio"] = merged["value_a"] / merged["value_b"]
        if table == "gemm":
            merged["flops"] = 2.0 * merged["m"] * merged["n"] * merged["k"]
        grp = [g for g in group if g in use]
        summ = []
        for gkey, sub in (merged.groupby(grp) if grp else [((), merged)]):
            sub = sub.sort_values(x)
            gkey = gkey if isinstance(gkey, tuple) else (gkey,)
            summ.append({**dict(zip(grp, gkey)), "n": len(sub), "geomean": float(np.exp(np.log(sub["ratio"]).mean())),
                         "min": float(sub["ratio"].min()), "max": float(sub["ratio"].max()),
                         "at_smallest": float(sub["ratio"].iloc[0]), "at_largest": float(sub["ratio"].iloc[-1])})
        note = f"aligned ignoring {', '.join(dropped)}" if dropped else ""
        out.append(TableComparison(table, merged, pd.DataFrame(summ), qty, note))
    return out

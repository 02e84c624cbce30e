"""Launching a replay: its options, the checks made before any rank works, and the torchrun launcher
behind `meshplan replay` (the command it builds, the job it starts, the failed rank it names).

Free of torch, so that the CLI can refuse a plan before any process starts; what each rank runs
once started is planner/runtime/job.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib.util import find_spec
from pathlib import Path
from typing import Literal, get_args

from costmodel.presets import load_model
from costmodel.specs import RECOMPUTE_POLICIES, ContextParallel, ModelSpec
from planner.plan import Plan, PlanError, Step, Unit, validate
from planner.plan.stream import PlanStream, is_stream
from planner.runtime.hf_spec import check_attention_window, hf_model_spec
from planner.runtime.trace import part_paths

CPImpl = ContextParallel  # context-parallel attention: overlapped ring, or all-gather first (as the cost model)
CP_IMPLS: tuple[str, ...] = get_args(CPImpl)
BLOCK_KERNELS = ("auto", "math", "fused-cpu", "flash-cuda")  # ring block kernel (auto: fused on CPU, math elsewhere)
OPTIMIZERS = ("adamw", "sgd")
FLASH_CUDA_ON_CPU = ("--ring-kernel flash-cuda runs on CUDA devices and this replay runs on CPU; use auto, math or "
                     "fused-cpu")
# glibc malloc on CPU ranks: no mmap'd blocks and no trimming, so a step's freed activations are reused instead of
# returned to the OS and faulted in again page by page (on one core the layers' non-attention work of a 4K-token
# unit ran 1.3x faster); a value already in the environment wins
CPU_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**36), "MALLOC_TOP_PAD_": str(2**28)}
Precision = Literal["fp32", "bf16"]  # fp32: plain; bf16: autocast compute, fp32 master weights and gradients
PRECISIONS: tuple[str, ...] = get_args(Precision)


class ReplayFailure(RuntimeError):
    """A replay that failed once running; the message names the rank, step and unit where one is known.
    exit_code: 1 when a rank is named, 2 when the job failed without naming one (as a refusal does)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class InjectedFailure:
    """Testing (`--inject-failure RANK:UNIT[:kill]`): global rank `rank` fails in the forward of unit
    `unit`, raising an error, or with `kill` by SIGKILL on itself (a crash that leaves no message)."""

    rank: int
    unit: int
    kill: bool = False

    @classmethod
    def parse(cls, text: str) -> InjectedFailure:
        parts = text.split(":")
        try:
            if len(parts) not in (2, 3) or parts[2:] not in ([], ["kill"]):
                raise ValueError
            return cls(int(parts[0]), int(parts[1]), kill=len(parts) == 3)
        except ValueError:
            raise PlanError(f"expected RANK:UNIT or RANK:UNIT:kill, got {text!r}") from None

    def __str__(self) -> str:
        """The RANK:UNIT[:kill] text `parse` reads."""
        return f"{self.rank}:{self.unit}" + (":kill" if self.kill else "")

    def fire(self, rank: int, unit: int) -> None:
        if (rank, unit) != (self.rank, self.unit):
            return
        if self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("injected failure (--inject-failure)")


@dataclass(frozen=True)
class ReplayOptions:
    plan_path: Path  # plan JSON, or a plan stream (*.jsonl: each rank reads only the steps it runs)
    model: str | None = None  # model preset / file; None = the plan's meta["model"]
    steps: int | None = None  # iterations to run; None = every plan step once (more cycle the plan)
    check: bool = False  # compare with a single-process reference on rank 0
    trace_path: Path | None = None  # measured trace JSON (a .chrome.json is written beside it)
    cp_impl: CPImpl | None = None  # context-parallel attention, ring or allgather; None: the plan's (replay_cp)
    ring_kernel: str = "auto"  # ring block kernel: "auto" (fused on CPU), "math", "fused-cpu" or "flash-cuda"
    seed: int = 0  # model init and generated tokens
    optimizer: str = "adamw"  # "adamw" or "sgd"
    lr: float = 1e-3  # learning rate
    tokens_path: Path | None = None  # flat .npy or Megatron .bin/.idx token stream; None = generated tokens
    dtype: Precision = "fp32"  # bf16: autocast forward, fp32 master weights and gradients (the cost model's)
    recompute: str | None = None  # none | selective | full; None = the plan's meta.training.recompute
    device: str = "auto"  # "auto" (cuda when available), "cpu" or "cuda"
    timeout_s: float = 300.0  # process-group timeout: a lost peer ends the job after this at most
    inject_failure: InjectedFailure | None = None  # tests: a rank failing (or killed) in a unit's forward
    status_dir: Path | None = None  # each rank keeps its position in rankN here (read by `meshplan replay`)
    hf_config: Path | None = None  # a HuggingFace config.json (Llama, Qwen2, Mistral) to build instead of --model
    hf_weights: Path | None = None  # its safetensors checkpoint (file or directory); None = seeded init
    plan_ahead: bool = False  # rank 0 plans step t+1 (the plan's request) while step t runs; sends each rank its part
    lengths: str | None = None  # plan-ahead: the length source (None: the plan's meta.options.lengths)

    def rank_args(self) -> list[str]:
        """The `python -m planner.runtime` arguments (planner/runtime/__main__.py) that give these options."""
        args = [str(self.plan_path), "--cp", self.cp_impl, "--ring-kernel", self.ring_kernel, "--seed", str(self.seed),
                "--optimizer", self.optimizer, "--lr", repr(self.lr), "--device", self.device,
                "--timeout-s", repr(self.timeout_s), "--dtype", self.dtype]
        args += ["--recompute", self.recompute] if self.recompute is not None else []
        args += ["--model", self.model] if self.model else []
        args += ["--steps", str(self.steps)] if self.steps is not None else []
        args += ["--check"] if self.check else []
        args += ["--trace", str(self.trace_path)] if self.trace_path is not None else []
        args += ["--tokens", str(self.tokens_path)] if self.tokens_path is not None else []
        args += ["--inject-failure", str(self.inject_failure)] if self.inject_failure else []
        args += ["--status-dir", str(self.status_dir)] if self.status_dir is not None else []
        args += ["--hf-config", str(self.hf_config)] if self.hf_config is not None else []
        args += ["--hf-weights", str(self.hf_weights)] if self.hf_weights is not None else []
        args += ["--plan-ahead"] if self.plan_ahead else []
        args += ["--lengths", self.lengths] if self.lengths is not None else []
        return args


# -- checks before any rank works --------------------------------------------------------------

def _choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PlanError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")


def load_for_replay(plan_path: str | Path) -> Plan:
    """The plan a replay starts from: a whole plan JSON, validated; or a plan stream's header with its
    first step only, validated (each rank reads and checks the steps it runs as it runs them)."""
    if is_stream(plan_path):
        stream = PlanStream(plan_path)
        return stream.with_steps([stream.validated_step(0)])
    plan = Plan.load(plan_path)
    validate(plan)
    return plan


def preflight(plan_path: str | Path, world_size: int | None, model: str | None = None, *, cp_impl: str = "ring",
              ring_kernel: str = "auto", optimizer: str = "adamw", steps: int | None = None, dtype: str = "fp32",
              recompute: str | None = None, hf_config: Path | None = None,
              hf_weights: Path | None = None) -> tuple[Plan, ModelSpec]:
    """Load and validate the plan (a stream: its header and first step, `load_for_replay`) against the
    job's world size (None: not known yet) and the model the replay will build, and check the options;
    raise PlanError or SpecError with a message a user can act on."""
    _choice("context-parallel implementation", cp_impl, CP_IMPLS)
    _choice("ring kernel", ring_kernel, BLOCK_KERNELS)
    _choice("optimizer", optimizer, OPTIMIZERS)
    _choice("--dtype", dtype, PRECISIONS)
    if steps is not None and steps < 1:
        raise PlanError(f"--steps must be >= 1, got {steps}")
    plan = load_for_replay(plan_path)
    m = plan.mesh
    if (plan.meta.get("training") or {}).get("zero_stage") == 3:
        raise PlanError(f"{plan_path}: a ZeRO-3 plan (meta.training.zero_stage 3): the replay keeps whole parameters "
                        "on every rank and runs no per-layer FSDP gathers, so it would not replay what the plan "
                        "priced; plan with --zero 1 or 2 to replay")
    if (plan.meta.get("training") or {}).get("mtp_layers"):
        raise PlanError(f"{plan_path}: a plan with multi-token prediction (meta.training.mtp_layers): the replay "
                        "runs no MTP depths, so it would not replay what the plan priced; plan without --mtp-layers")
    if world_size is not None and m.world_size != world_size:
        raise PlanError(f"{plan_path}: the plan is for world_size {m.world_size} (tp {m.tp} × pp {m.pp} × hdp "
                        f"{m.hdp}) but this job has {world_size} processes; launch {m.world_size} "
                        f"(meshplan replay --nproc {m.world_size})")
    policy = replay_recompute(plan, recompute, str(plan_path))
    for st in plan.steps:
        check_step(st, plan.steps[0].chunks_per_stage, policy, str(plan_path))
    if hf_config is not None or hf_weights is not None:
        if hf_config is None:
            raise PlanError(f"--hf-weights {hf_weights} needs --hf-config (the checkpoint's config.json)")
        return plan, hf_model_spec(hf_config, hf_weights, plan, model)
    name = model or plan.meta.get("model")
    if not name:
        raise PlanError(f"{plan_path}: the plan names no model (meta.model); pass --model NAME")
    # the plan's own copy of the model it priced: a plan made from a config file replays on a machine without it
    spec = (ModelSpec.from_dict(plan.meta["model_spec"]) if model is None and plan.meta.get("model_spec")
            else load_model(str(name)))
    if spec.is_moe or spec.is_mla:
        raise PlanError(f"model {spec.name!r}: {'MoE' if spec.is_moe else 'latent-attention (MLA)'} replay is not "
                        "implemented (dense Llama-style models only); pass --model tiny or a dense preset")
    check_attention_window(spec, plan, f"model {spec.name!r}")
    block = (spec.norm, spec.mlp, spec.position, spec.linear_bias, spec.dropout)
    if block != ("rmsnorm", "swiglu", "rope", False, False):  # the one block runtime/model.py builds
        raise PlanError(f"model {spec.name!r}: replay builds Llama-style blocks (RMSNorm, SwiGLU, RoPE, no linear "
                        f"biases or dropout), not {spec.norm}/{spec.mlp}/{spec.position} blocks; pass --model tiny or "
                        "a Llama-style preset")
    if spec.head_dim % 2:
        raise PlanError(f"model {spec.name!r}: RoPE needs an even head_dim, got {spec.head_dim}")
    for what, n in (("heads", spec.heads), ("kv_heads", spec.kv_heads), ("ffn", spec.ffn), ("vocab", spec.vocab)):
        if n % m.tp:
            raise PlanError(f"model {spec.name!r}: {what} = {n} does not split over tp = {m.tp} (whole heads, equal "
                            "FFN and vocabulary slices per TP rank); pass a model whose heads, kv_heads, ffn and "
                            "vocab divide by tp (Megatron pads the vocabulary to a multiple of 128 x tp)")
    for st in plan.steps:  # later steps of a stream are checked by the ranks (UlyssesAttention)
        for u in st.units:
            check_heads(u, spec.kv_heads // m.tp)
    chunks = m.pp * plan.steps[0].chunks_per_stage
    if spec.layers < chunks:
        raise PlanError(f"model {spec.name!r} has {spec.layers} layers, fewer than the plan's {chunks} pipeline "
                        "chunks (pp × v); pass a deeper --model")
    return plan, spec


def check_heads(unit: Unit, kv_heads: int) -> None:
    """Refuse a Ulysses degree that does not divide the K/V heads a rank holds (its TP share)."""
    if kv_heads % unit.ulysses:
        raise PlanError(f"unit {unit.id}: ulysses degree {unit.ulysses} does not divide the {kv_heads} KV heads per "
                        "TP rank; plan it with a ulysses degree dividing kv_heads / tp")


def check_step(st: Step, chunks: int, recompute: str, where: str) -> None:
    """What the replay needs of a step beyond validate(): the run's one layer placement (`chunks`, the
    v of its first step), no empty slice (a slice is the j-th part of every document of its unit), and
    no recompute with slices. Run on every step before it is replayed (streamed and planned-ahead steps
    included)."""
    if st.chunks_per_stage != chunks:
        raise PlanError(f"{where}: steps use different chunk counts v {sorted({chunks, st.chunks_per_stage})}; a run "
                        "places its layers once, so every step must use the same v (re-plan with `meshplan plan`, "
                        "which writes one v per plan, or pin it with --pp-v)")
    for u in st.units:
        if u.slices == 1:
            continue
        if u.ulysses > 1:  # slices attend earlier slices' K/V cache, gathered over all members
            raise PlanError(f"{where}: step {st.step} unit {u.id}: ulysses {u.ulysses} with {u.slices} slices is not "
                            "implemented in the replay; plan sliced units with ulysses 1")
        if recompute != "none":
            raise PlanError(f"{where}: recompute {recompute!r} with sliced units (slices > 1) is not implemented: "
                            "their attention fills a KV cache once per slice; pass --recompute none")
        per_doc: dict[int, int] = {}
        for p in u.pieces:
            per_doc[p.seq] = per_doc.get(p.seq, 0) + p.tokens
        longest = max(per_doc.values())
        if u.slices > longest:
            raise PlanError(f"{where}: step {st.step} unit {u.id} has {u.slices} slices but its longest "
                            f"document only {longest} tokens; a slice must hold at least one token")


def replay_cp(plan: Plan, override: str | None) -> str:
    """The context-parallel attention the replay runs: `override` (--cp), else what the plan was priced with
    (meta.training.cp), else ring (hand-built plans carry no training section)."""
    cp = override if override is not None else (plan.meta.get("training") or {}).get("cp", "ring")
    _choice("context-parallel implementation", cp, CP_IMPLS)
    return cp


def pricing_differences(plan: Plan) -> list[str]:
    """What the plan's times were priced with that this executor does not run, each with the flag that prices what
    runs (empty: priced as it runs; hand-built plans carry no training section and price nothing). The executor runs
    eager PyTorch ops (written plans default to Megatron's fused kernels) and TP without sequence parallelism
    (written plans default to Megatron's SP, which prices the norms and residuals on 1/tp of the tokens and each
    all-reduce as a gather plus a scatter)."""
    training = plan.meta.get("training")
    if not training:
        return []
    out = []
    if training.get("kernels", "fused") != "eager":
        out.append("priced with fused (Megatron) elementwise kernels, but the replay runs eager PyTorch ops: plan "
                   "with --kernels eager")
    if plan.mesh.tp > 1 and training.get("sequence_parallel", True):
        out.append("priced with sequence parallelism, but the replay runs TP without it: plan with "
                   "--no-sequence-parallel")
    return out


def replay_recompute(plan: Plan, override: str | None, where: str) -> str:
    """The recompute policy the replay applies: `override` (--recompute), else the plan's
    meta.training.recompute, else none (hand-built plans carry no training section)."""
    training = plan.meta.get("training") or {}
    policy = override if override is not None else training.get("recompute", "none")
    if override is None and training.get("recompute_modules"):
        mods = ", ".join(map(str, training["recompute_modules"]))
        raise PlanError(f"{where}: meta.training.recompute_modules ({mods}) are Megatron-core's; the replay runs its "
                        "own none, selective or full: pass --recompute")
    if policy not in RECOMPUTE_POLICIES:
        source = "--recompute" if override is not None else f"{where}: meta.training.recompute"
        raise PlanError(f"{source} is {policy!r}; the replay applies one of {', '.join(RECOMPUTE_POLICIES)}")
    return policy


@dataclass(frozen=True)
class Prepared:
    """What every rank checks before the process group exists."""

    plan: Plan  # the whole plan JSON; a plan stream's header with its first step only
    spec: ModelSpec  # the model the replay builds (dense; preflight checked it against the mesh)
    iterations: int  # replayed steps
    chunks: int = 1  # model chunks per pipeline stage (v), the same in every step
    recompute: str = "none"  # the recompute policy applied (replay_recompute)


def prepare(opts: ReplayOptions, world_size: int) -> Prepared:
    """Every check that needs no process group (preflight)."""
    plan, spec = preflight(opts.plan_path, world_size, opts.model, cp_impl=opts.cp_impl or "ring",
                           ring_kernel=opts.ring_kernel, optimizer=opts.optimizer, steps=opts.steps,
                           dtype=opts.dtype, recompute=opts.recompute, hf_config=opts.hf_config,
                           hf_weights=opts.hf_weights)
    return Prepared(plan, spec, replay_iterations(opts, plan), plan.steps[0].chunks_per_stage,
                    replay_recompute(plan, opts.recompute, str(opts.plan_path)))


def replay_iterations(opts: ReplayOptions, plan: Plan) -> int:
    """--steps, else every step of the plan once (a stream's step count is in its index)."""
    if opts.steps is not None:
        return opts.steps
    return PlanStream(opts.plan_path).steps if is_stream(opts.plan_path) else len(plan.steps)


class Position:
    """Where a rank is in the run ("step 0 (plan step 0) unit 3 (HDP ranks [0, 1])"). Named in the
    rank's own error, and kept in STATUS_DIR/rankN so that the launcher can name it when the process
    dies without a word (SIGKILL, the out-of-memory killer): the page cache outlives it."""

    def __init__(self, status_dir: Path | None, rank: int) -> None:
        self._fd = (os.open(status_dir / f"rank{rank}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    if status_dir is not None else None)
        self.text = ""
        self.set("start-up")

    def set(self, text: str) -> None:
        self.text = text
        if self._fd is not None:
            data = text.encode()
            os.pwrite(self._fd, data, 0)
            os.ftruncate(self._fd, len(data))


# -- the torchrun launcher ---------------------------------------------------------------------

# torchrun options that make a multi-node job: with any of them there is no --standalone.
_RENDEZVOUS_FLAGS = ("--nnodes", "--node-rank", "--node_rank", "--rdzv-endpoint", "--rdzv_endpoint", "--rdzv-backend",
                     "--rdzv_backend", "--rdzv-id", "--rdzv_id", "--rdzv-conf", "--rdzv_conf", "--master-addr",
                     "--master_addr", "--master-port", "--master_port")
# torchrun's own lines once a worker failed (its traceback and failure summary follow them).
_LAUNCHER_FAILURE = ("failed (exitcode:", "closing signal SIG", "ChildFailedError")
_SUMMARY_FIELD = re.compile(r"\s*(?P<key>rank|exitcode)\s*:\s*(?P<value>-?\d+)")  # "rank : 7 (local_rank: 3)"
PEER_STOPPED = "stopped (a peer rank failed first)"  # in the error of a rank stopped by another's failure


def _torchrun_nnodes(args: Sequence[str]) -> str | None:
    for i, a in enumerate(args):
        if a.startswith("--nnodes="):
            return a.split("=", 1)[1]
        if a == "--nnodes" and i + 1 < len(args):
            return args[i + 1]
    return None


@dataclass(frozen=True)
class Launch:
    """What a torchrun job's stderr said."""

    returncode: int
    root: str | None  # first rank error that is a root cause (not a rank stopped by a peer's failure)
    stopped: str | None  # first error of a rank stopped by a peer's failure (it names the unit it waited in)
    failures: tuple[tuple[int, int], ...] = ()  # launcher's summary: (global rank, exit code), root cause last

    def dead(self) -> tuple[int, int] | None:
        """(rank, exit code) to blame: a rank killed by a signal other than the SIGTERM torchrun sends to
        the survivors (the first observed failure may be a survivor, stopped by its peer's death), else
        the launcher's root cause."""
        killed = [f for f in self.failures if f[1] < 0 and -f[1] != signal.SIGTERM]
        return killed[0] if killed else (self.failures[-1] if self.failures else None)


def run_torchrun(cmd: list[str], env: dict[str, str]) -> Launch:
    """Run torchrun, stdout straight through, stderr forwarded line by line until the job fails: after
    a rank's error line or the launcher's first failure line, only root-cause error lines of ranks are
    forwarded: not those of ranks stopped by a peer's failure (one per rank), nor the launcher's
    traceback and summary (whose root cause is parsed instead)."""
    errors: list[str] = []
    failures: list[tuple[int, int]] = []
    rank: int | None = None
    failing = in_summary = False
    with subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, bufsize=1) as proc:
        for line in proc.stderr:
            is_error = line.startswith("error: ")
            if is_error:
                errors.append(line[len("error: "):].strip())
            in_summary = in_summary or (failing and line.startswith("Failures:"))
            field = _SUMMARY_FIELD.match(line) if in_summary else None
            if field and field["key"] == "rank":
                rank = int(field["value"])
            elif field and rank is not None:  # the exit code of the rank just named
                failures.append((rank, int(field["value"])))
                rank = None
            failing = failing or is_error or any(m in line for m in _LAUNCHER_FAILURE)
            if (is_error and PEER_STOPPED not in line) or not failing:
                sys.stderr.write(line)
                sys.stderr.flush()
    return Launch(proc.returncode, next((e for e in errors if PEER_STOPPED not in e), None),
                  next((e for e in errors if PEER_STOPPED in e), None), tuple(failures))


def replay_failure(launch: Launch, status_dir: Path) -> str:
    """One line for a failed job, naming the rank and where it was (step, unit): its own error, or for a
    rank that died without a word (a signal) the launcher's verdict and the Position the rank kept in
    status_dir."""
    if launch.root:
        return launch.root
    dead = launch.dead()
    if dead is not None and (dead[1] < 0 or launch.stopped is None):
        rank, code = dead
        status = status_dir / f"rank{rank}"
        where = f" in {status.read_text().strip()}" if status.is_file() else ""
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            hint = " (SIGKILL with no error is often the out-of-memory killer)" if -code == signal.SIGKILL else ""
            return f"rank {rank} was killed by {name}{where}{hint}"
        return f"rank {rank} exited with code {code}{where}; see its output above"
    if launch.stopped:
        return launch.stopped
    return f"torchrun exit code {launch.returncode} and no rank named the cause; see the output above"


def replay(opts: ReplayOptions, nproc: int, torchrun_args: Sequence[str] = ()) -> None:
    """`meshplan replay`: check the plan and options here, then run `python -m planner.runtime` on `nproc`
    processes per node under torchrun, standalone on this machine unless `torchrun_args` (passed to
    torchrun) make a multi-node job. The ranks' stdout passes straight through. Raises PlanError or
    SpecError before any process starts, ReplayFailure (one line, naming the failed rank) after."""
    if find_spec("torch") is None:
        raise PlanError("torch is not installed; install the runtime extra: pip install 'meshplan[runtime]'")
    if opts.hf_config is not None and (find_spec("transformers") is None or find_spec("safetensors") is None):
        raise PlanError("--hf-config needs transformers and safetensors; install the hf extra: "
                        "pip install 'meshplan[hf]'")
    extra = list(torchrun_args)
    multi_node = any(a.split("=", 1)[0] in _RENDEZVOUS_FLAGS for a in extra)
    nnodes = _torchrun_nnodes(extra)
    world = nproc * int(nnodes) if nnodes and nnodes.isdigit() else (None if multi_node else nproc)
    plan, _ = preflight(opts.plan_path, world, opts.model, cp_impl=opts.cp_impl or "ring",
                        ring_kernel=opts.ring_kernel, optimizer=opts.optimizer, steps=opts.steps, dtype=opts.dtype,
                        recompute=opts.recompute, hf_config=opts.hf_config, hf_weights=opts.hf_weights)
    if opts.ring_kernel == "flash-cuda":
        import torch

        if opts.device == "cpu" or not torch.cuda.is_available():
            raise PlanError(FLASH_CUDA_ON_CPU)
    opts = replace(opts, cp_impl=replay_cp(plan, opts.cp_impl))  # the ranks get it explicitly
    for why in pricing_differences(plan):  # its predicted_s would mislead
        warnings.warn(f"{opts.plan_path}: {why} to compare its predicted times with this run")
    if opts.lengths is not None and not opts.plan_ahead:
        raise PlanError(f"--lengths {opts.lengths} plans steps ahead: it needs --plan-ahead")
    if opts.plan_ahead:  # the request must plan here, before any process starts (rank 0 plans it again)
        from planner.runtime.ahead import step_planner

        step_planner(plan, opts.lengths, replay_iterations(opts, plan), str(opts.plan_path))
    env = dict(os.environ)
    # one thread per rank, as torchrun's own default and as the CPU profile times its tables (so a CPU replay runs
    # what the plan priced: a rank stands for one device); OMP_NUM_THREADS in the environment wins
    env.setdefault("OMP_NUM_THREADS", "1")
    if opts.device != "cuda":  # CPU ranks: freed memory kept for reuse, as CUDA's caching allocator does on GPU
        env = {**CPU_MALLOC_ENV, **env}
    with tempfile.TemporaryDirectory(prefix="meshplan-replay-") as status_dir:  # where each rank is
        ranks = replace(opts, status_dir=Path(status_dir))
        cmd = [sys.executable, "-m", "torch.distributed.run", *([] if multi_node else ["--standalone"]), *extra,
               "--nproc-per-node", str(nproc), "-m", "planner.runtime", *ranks.rank_args()]
        launch = run_torchrun(cmd, env)
        if launch.returncode:
            message = replay_failure(launch, Path(status_dir))
            code = 1 if message.startswith("rank") else 2
            parts = part_paths(opts.trace_path) if opts.trace_path is not None else []
            if parts:  # what the ranks recorded before the failure (planner/runtime/trace.py)
                message += f" (partial traces: {parts[0].with_name(opts.trace_path.stem + '.rank*.jsonl')})"
            raise ReplayFailure(message, exit_code=code)

"""meshplan command line: thin typer app. Parses, calls library functions, prints with rich.
Library errors (SpecError, ProfileError, PlanError, SourceError, ...) become one line on stderr
and exit code 2, a bug one line and exit code 3 (MESHPLAN_DEBUG=1 shows its traceback), Ctrl-C
exit code 130; nothing here holds planning logic. Tables and help are never cut: see Table."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import traceback
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import List, Optional

import typer
from rich import box
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table as _RichTable
from typer.core import TyperGroup

from costmodel.presets import cluster_names, load_cluster, load_model, model_names
from costmodel.specs import (ATTENTION_KERNELS, AUTO_RECOMPUTE, FP8_RECIPES, GRAD_ACCUMULATIONS, KERNELS,
                             LOSS_KERNELS, MOE_DISPATCHERS, OPTIMIZER_MOMENTS, RECOMPUTE_MODULES, RECOMPUTE_POLICIES,
                             TRAIN_DTYPES,
                             SpecError,
                             check_recompute)
from profiles.table import ProfileError, load_profile, profile_names

# Every library error type a user can cause; each command section adds its package's type.
USER_ERRORS: tuple[type[Exception], ...] = (SpecError, ProfileError, OSError)
# typer's own ways out of a command (exit codes, usage errors): never reported as internal errors.
_TYPER_EXITS = (typer.Exit, typer.Abort, typer.TyperException, BrokenPipeError)
_PIPE_WIDTH = 100_000  # a pipe or file has no width: tables and lines are printed whole


def _error_line(message: str) -> None:
    """One `error: ...` line on stderr; the message is plain text (user paths, names), never markup."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _report(e: BaseException) -> int:
    """Print what escaped a command as one line on stderr and return its exit code: 2 for a
    user's error, 130 when interrupted, 3 for a bug (its traceback with MESHPLAN_DEBUG=1)."""
    if isinstance(e, KeyboardInterrupt):
        err.print("interrupted", highlight=False)
        return 130
    if isinstance(e, USER_ERRORS):
        _error_line(str(e))
        return 2
    if os.environ.get("MESHPLAN_DEBUG", "") not in ("", "0"):
        traceback.print_exception(e)
        _error_line(f"internal error: {type(e).__name__}: {e}")
    else:
        _error_line(f"internal error: {type(e).__name__}: {e} (rerun with MESHPLAN_DEBUG=1 for the traceback)")
    return 3


class _Group(TyperGroup):
    """meshplan's command groups: whatever a command raises becomes one line and an exit code,
    never a traceback (here rather than in _App.__call__ so that CliRunner tests see it too), and
    the list of commands shows each one's first sentence whole."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _TYPER_EXITS:
            raise
        except (Exception, KeyboardInterrupt) as e:
            raise typer.Exit(_report(e)) from e

    def format_commands(self, ctx, formatter) -> None:
        rows = [(name, cmd.get_short_help_str(limit=_PIPE_WIDTH)) for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if rows:  # click would cut each summary to one line with "..."; write_dl wraps it instead
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class _App(typer.Typer):
    """Typer app whose errors outside a command (option callbacks) are one line too."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except Exception as e:  # SystemExit (every normal end) passes through
            sys.exit(_report(e))


class _Console(Console):
    """stdout: the terminal's width in a terminal; in a pipe or file no width limit, so
    `meshplan presets | grep llama3` sees every name and number whole."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        return size if self.is_terminal else ConsoleDimensions(_PIPE_WIDTH, size.height)


class Table(_RichTable):
    """A rich Table that never cuts what a user reads or types. When it is wider than the terminal,
    headers wrap at their spaces, then the borders go, then cells wrap at their spaces (each
    column at least as wide as its longest word: names and numbers stay whole), and only when even
    that does not fit do cells fold onto more lines (rich's default would end them with `…`)."""

    def add_column(self, *args, overflow="fold", **kwargs) -> None:
        super().add_column(*args, overflow=overflow, **kwargs)

    def add_row(self, *renderables, **kwargs) -> None:
        while len(self.columns) < len(renderables):  # rich's implicit columns would ellipsise
            self.add_column()
        super().add_row(*renderables, **kwargs)

    def __rich_console__(self, console, options):
        return _RichTable.__rich_console__(self._narrowed(console, options), console, options)

    def _narrowed(self, console, options) -> _RichTable:
        """This table, or a narrower copy of it that fits options.max_width if one can."""
        if _natural_width(self, console, options) <= options.max_width:
            return self
        t = copy.copy(self)
        t.columns = [dataclasses.replace(c, header=c.header.replace(" ", "\n")) if isinstance(c.header, str) else c
                     for c in self.columns]
        if _natural_width(t, console, options) <= options.max_width:
            return t
        t.box, t.show_edge, t.padding = box.SIMPLE_HEAD, False, (0, 0)  # one space between columns
        natural = _natural_width(t, console, options)
        if natural <= options.max_width:
            return t
        # rich would shrink the widest columns first and fold their words; give each column its
        # longest word and share the rest in proportion to how much more each would take
        wide = options.update_width(_PIPE_WIDTH)
        spans = [[Measurement.get(console, wide, r) for r in (c.header, *c.cells)] for c in t.columns]
        mins = [max(m.minimum for m in col) for col in spans]
        maxs = [max(m.maximum for m in col) for col in spans]
        budget = options.max_width - (natural - sum(maxs))  # less borders and padding
        if sum(mins) <= budget:
            extra, slack = budget - sum(mins), [hi - lo for lo, hi in zip(mins, maxs)]
            t.columns = [dataclasses.replace(c, width=lo + extra * s // sum(slack))
                         for c, lo, s in zip(t.columns, mins, slack)]
        return t


def _natural_width(table: _RichTable, console, options) -> int:
    """The width a table takes when nothing limits it."""
    return table.__rich_measure__(console, options.update_width(_PIPE_WIDTH)).maximum


app = _App(cls=_Group, no_args_is_help=True, pretty_exceptions_enable=False,
           rich_markup_mode=None,  # click's plain help wraps long option names and values instead of cutting them
           context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every subcommand
           help="Plan dynamic DP x CP (HDP) meshes and pipeline slicing for long-context training.")
presets_app = typer.Typer(cls=_Group, invoke_without_command=True,
                          help="List model, cluster and profile presets; `show NAME` prints one.")
app.add_typer(presets_app, name="presets")

out = _Console()
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print `error: message` (plain text, escaped here) and exit with code."""
    _error_line(message)
    raise typer.Exit(code)


def one_of(choices: tuple[str, ...]) -> str:
    """`a, b or c`: the choices of an option, for its help and its error."""
    *head, last = choices
    return f"{', '.join(head)} or {last}" if head else last


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    """Refuse, in one line, a value that is not one of the library's `choices`."""
    if value not in choices:
        fail(f"{option} must be {one_of(choices)}, got {value!r}")


# --recompute of `plan` and `whatif`: the cost model's policies, checked by planner.api / costmodel.specs
RECOMPUTE_HELP = f"{' | '.join(RECOMPUTE_POLICIES)} | {AUTO_RECOMPUTE} (least that fits the context)."
RECOMPUTE_MODULES_HELP = (f"Megatron-core's --recompute-modules for the selective policy (--recompute selective, or "
                          f"auto where it picks selective), a comma list of {', '.join(RECOMPUTE_MODULES)} (Megatron's "
                          "default: core_attn), priced as megatron-core 0.14-0.16 runs them; default: meshplan's "
                          "selective (the attention core where materialised, SwiGLU's product).")


def recompute_modules_arg(text: Optional[str]) -> tuple[str, ...] | None:
    """--recompute-modules as a tuple of Megatron-core's module names (None: not given); one-line refusals."""
    if text is None:
        return None
    given = _csv_list(text, "--recompute-modules")
    for mod in given:
        check_choice("--recompute-modules", mod, RECOMPUTE_MODULES)
    return tuple(m for m in RECOMPUTE_MODULES if m in given)  # one order, each once: a sweep's keys stay stable


def writable(path: Optional[Path], option: str) -> None:
    """Refuse, before any work, an output path that cannot be written: a folder, or one under a
    file or an unwritable folder (missing folders are fine: atomic_write_text creates them)."""
    if path is None:
        return
    if path.is_dir():
        fail(f"{option} {path}: is a folder, give a file name")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        fail(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(f"{option} {path}: no permission to write in {parent}")


def writable_figure(path: Optional[Path], option: str) -> None:
    """`writable` for a figure: PATH's stem gets a .png and an .svg, so PATH ends in one of them or in neither."""
    if path is None:
        return
    writable(path, option)
    if path.suffix not in ("", ".png", ".svg"):
        fail(f"{option} {path}: a figure is written as PNG and SVG; give a name ending in .png, .svg or neither")
    for ext in (".png", ".svg"):
        writable(path.with_suffix(ext), option)


def wrote_figure(paths: list[Path]) -> None:
    if paths:
        out.print(escape("wrote " + ", ".join(str(p) for p in paths)), highlight=False, soft_wrap=True)


def _version_callback(value: bool) -> None:
    if value:
        try:
            v = version("meshplan")
        except PackageNotFoundError:
            v = "unknown (not installed)"
        out.print(f"meshplan {v}")
        raise typer.Exit()


@app.callback()
def main(version_: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """meshplan: measure, model and plan long-context training steps."""
    import warnings

    # A library warning (profile of another device, a repeated lengths file) is one plain line,
    # not Python's `file:line: UserWarning` format, in every command that does not collect them.
    warnings.showwarning = lambda message, *_a, **_k: err.print(f"[yellow]warning:[/] {escape(str(message))}",
                                                                highlight=False, soft_wrap=True)


@presets_app.callback()
def presets_list(ctx: typer.Context,
                 as_json: bool = typer.Option(False, "--json", help="Print one JSON object {models, clusters, "
                                              "profiles}, each a list of specs with their names.")) -> None:
    """List every model, cluster and profile preset."""
    if ctx.invoked_subcommand is not None:
        return
    models = [load_model(n) for n in model_names()]
    clusters = [load_cluster(n) for n in cluster_names()]
    profiles = {n: load_profile(n).fingerprint for n in profile_names()}
    if as_json:
        sys.stdout.write(json.dumps({"models": [m.to_dict() for m in models],
                                     "clusters": [c.to_dict() for c in clusters],
                                     "profiles": [{**dataclasses.asdict(fp), "name": n} for n, fp in profiles.items()]},
                                    default=str) + "\n")
        return
    t = Table(title="models", show_lines=False)
    for c in ("name", "layers", "hidden", "heads/kv", "ffn", "vocab", "experts", "params (B)", "active (B)"):
        t.add_column(c, justify="right" if c not in ("name",) else "left")
    for m in models:
        t.add_row(escape(m.name), str(m.layers), str(m.hidden), f"{m.heads}/{m.kv_heads}", str(m.ffn), str(m.vocab),
                  f"{m.experts}x top{m.top_k}" if m.is_moe else "-", f"{m.parameters / 1e9:.2f}",
                  f"{m.active_parameters / 1e9:.2f}")
    out.print(t)
    t = Table(title="clusters")
    for c in ("name", "gpu", "nodes x gpus", "GB per GPU (CUDA)", "intra GB/s", "inter GB/s", "profile"):
        t.add_column(c)
    for c in clusters:
        t.add_row(escape(c.name), escape(c.gpu), f"{c.nodes} x {c.gpus_per_node}", f"{c.gpu_memory_bytes / 1e9:.1f}",
                  f"{c.intra_node_bw_bytes_per_s / 1e9:.0f}", f"{c.inter_node_bw_bytes_per_s / 1e9:.0f}",
                  escape(c.profile))
    out.print(t)
    t = Table(title="profiles")
    for c in ("name", "source", "device", "created", "sha256"):
        t.add_column(c)
    for n, fp in profiles.items():
        t.add_row(escape(n), escape(fp.source), escape(fp.device), fp.created.replace("T", " "), fp.sha256[:12])
    out.print(t)


@presets_app.command("show")
def presets_show(name: str = typer.Argument(..., help="Model, cluster or profile name (or a file path)."),
                 as_json: bool = typer.Option(False, "--json", help="Print the spec as JSON.")) -> None:
    """Print one preset: a model (with derived parameter counts), a cluster or a profile fingerprint."""
    if name in model_names():
        d = load_model(name).to_dict()
    elif name in cluster_names():
        d = load_cluster(name).to_dict()
    elif name in profile_names():
        p = load_profile(name)
        d = {"fingerprint": p.fingerprint.__dict__, "constants": p.constants,
             "rows": {k: len(v) for k, v in p.tables.items()}}
    else:
        try:
            d = load_model(name).to_dict()
        except SpecError:
            fail(f"no preset named {name!r}; models: {', '.join(model_names())}; clusters: "
                 f"{', '.join(cluster_names())}; profiles: {', '.join(profile_names())}")
    if as_json:
        sys.stdout.write(json.dumps(d, indent=2, default=str) + "\n")
    else:
        t = Table(title=escape(name), show_header=False)
        for k, v in d.items():
            t.add_row(escape(k), escape(json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v)))
        out.print(t)


# -- lengths: length sources and their distributions ---------------------------------------------
from planner.workload import (DEFAULT_SAMPLES, SourceError, describe_lengths, format_tokens,  # noqa: E402
                             open_source, parse_tokens, split_at_context)

USER_ERRORS += (SourceError,)

lengths_app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True,
                          help="Sequence-length sources: files, the Wikipedia sample, synthetic families.")
app.add_typer(lengths_app, name="lengths")


@lengths_app.command("describe")
def lengths_describe(
        source: str = typer.Argument(..., help="A lengths file (.txt[.gz], .csv, .tsv, .parquet, .jsonl, Megatron "
                                               ".idx), 'wikipedia', or a synthetic family: byted-like, github-like, "
                                               "lognormal[:median=600,sigma=1.2,max=N], longalign-like[:long_share=F], "
                                               "prolong-like[:pack=N]."),
        max_context: Optional[str] = typer.Option(None, "--max-context", help="Cut longer documents into pieces of "
                                                  "this many tokens first (K/M suffixes, K = 1024), e.g. 2M."),
        as_json: bool = typer.Option(False, "--json", help="Print {buckets, count, tokens} as JSON."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of the per-bucket shares."),
        column: Optional[str] = typer.Option(None, "--column", help="Table column holding the lengths."),
        samples: Optional[int] = typer.Option(None, "--samples", help=f"Synthetic: lengths to draw (default "
                                              f"{DEFAULT_SAMPLES:,}); files: describe only the first N."),
        seed: int = typer.Option(0, "--seed", help="Synthetic: sampling seed.")) -> None:
    """Per power-of-two bucket (hi/2, hi]: the share of samples, of tokens and of attention FLOPs (∝ s²)."""
    src = open_source(source, column=column)
    max_context_tokens = parse_tokens(max_context) if max_context is not None else None
    lengths = src.sample(samples, seed)
    d = describe_lengths(lengths, max_context_tokens)
    if plot is not None:
        from planner.report import plot_description  # matplotlib: only when a plot is asked for

        plot_description(d, plot, title=src.name)
    if as_json:
        sys.stdout.write(json.dumps(d) + "\n")
        return
    t = Table(title=f"{src.name}: {d['count']:,} sequences, {d['tokens']:,} tokens")
    for c in ("tokens in (lo, hi]", "samples %", "tokens %", "attn FLOPs %"):
        t.add_column(c, justify="right")
    for b in d["buckets"]:
        t.add_row(f"({format_tokens(b['lo'])}, {format_tokens(b['hi'])}]", f"{100 * b['samples_share']:.3f}",
                  f"{100 * b['tokens_share']:.2f}", f"{100 * b['attn_flops_share']:.2f}")
    out.print(t)
    if max_context_tokens is not None:
        n_split = split_at_context(lengths, max_context_tokens).split_documents
        out.print(f"{n_split:,} documents longer than {format_tokens(max_context_tokens)} tokens were cut into "
                  f"max-context pieces ({len(lengths):,} documents -> {d['count']:,} sequences).")
    facts = getattr(src, "facts", ())
    if facts:
        ft = Table(title=f"published facts met by {src.name} (seed {seed})", caption=getattr(src, "summary", None))
        for c in ("fact", "source", "measured", "accepted", "ok"):
            ft.add_column(c)
        for f in facts:
            ft.add_row(f.claim, f.ref, f"{100 * f.measure(lengths):.3f}%",
                       f"{100 * f.low:.4g}-{100 * f.high:.4g}%", "yes" if f.holds(lengths) else "[red]no[/]")
        out.print(ft)
    if plot is not None:
        out.print(f"wrote {plot}")


# -- replay: run a plan for real under torchrun (planner/runtime) --------------------------------
from planner.plan import PlanError  # noqa: E402
from planner.runtime import (BLOCK_KERNELS, CP_IMPLS, OPTIMIZERS, PRECISIONS, InjectedFailure,  # noqa: E402
                             ReplayFailure, ReplayOptions, replay as run_replay)

USER_ERRORS += (PlanError,)


@app.command("replay", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def replay(ctx: typer.Context,
           plan: Path = typer.Argument(..., help="Plan JSON (any tp × pp × hdp mesh of a dense model), or a plan "
                                       "stream (.jsonl, `meshplan plan --out x.jsonl`): each rank reads only the "
                                       "steps it runs."),
           nproc: int = typer.Option(..., "--nproc", help="Processes per node: one per GPU, or CPU workers (gloo)."),
           model: Optional[str] = typer.Option(None, "--model", help="Model preset or file to build instead of "
                                               "the plan's meta.model, e.g. tiny."),
           steps: Optional[int] = typer.Option(None, "--steps", help="Iterations (default: every plan step once; "
                                               "more cycle the plan with fresh tokens)."),
           check: bool = typer.Option(False, "--check", help="Rank 0 also runs a single-process reference step; "
                                      'prints {"check": {"max_rel_grad_err", "loss_abs_err", "ranks", "units"}}.'),
           trace: Optional[Path] = typer.Option(None, "--trace", help="Measured trace JSON (PATH.chrome.json is "
                                                "written beside it), only once the run finished."),
           cp: Optional[str] = typer.Option(None, "--cp", help=f"Context-parallel attention: {one_of(CP_IMPLS)} "
                                            "(ring overlaps its transfers); default: the plan's meta.training.cp. A "
                                            "unit's own cp (meshplan plan --cp-kinds) wins."),
           ring_kernel: str = typer.Option("auto", "--ring-kernel", help=f"Ring block kernel: {one_of(BLOCK_KERNELS)} "
                                           "(auto: fused on CPU, plain torch elsewhere; flash-cuda: torch's CUDA "
                                           "flash kernel per block pair, opt-in, not yet run on a GPU by this "
                                           "project)."),
           seed: int = typer.Option(0, "--seed", help="Model init and generated tokens."),
           optimizer: str = typer.Option("adamw", "--optimizer", help=f"{one_of(OPTIMIZERS)}."),
           lr: float = typer.Option(1e-3, "--lr", help="Learning rate."),
           tokens: Optional[Path] = typer.Option(None, "--tokens", help="Token ids: a flat .npy array or a Megatron "
                                                 ".bin/.idx pair; labels stay inside each document (default: "
                                                 "tokens generated per sequence id)."),
           dtype: str = typer.Option("fp32", "--dtype", help=f"{one_of(PRECISIONS)}: bf16 autocasts the forward, "
                                     "with fp32 master weights and gradients (--check: a bf16 reference)."),
           recompute: Optional[str] = typer.Option(None, "--recompute", help="Activation recompute: none, "
                                                   "selective (attention core) or full (each layer); default: "
                                                   "the plan's meta.training.recompute."),
           hf_config: Optional[Path] = typer.Option(None, "--hf-config", help="A HuggingFace config.json (Llama, "
                                                    "Qwen2, Mistral) to build with transformers instead of --model "
                                                    "(pp and CP; not tp > 1); needs the hf extra."),
           hf_weights: Optional[Path] = typer.Option(None, "--hf-weights", help="Its safetensors checkpoint (file or "
                                                     "directory); each rank reads only its stage's tensors (default: "
                                                     "seeded init)."),
           plan_ahead: bool = typer.Option(False, "--plan-ahead", help="Rank 0 plans step t+1 with the plan's own "
                                           "request (its meta: strategy, options, specs, profile) while step t "
                                           "runs, and sends each rank only its units; --steps iterations."),
           lengths: Optional[str] = typer.Option(None, "--lengths", help="--plan-ahead: the length source to plan "
                                                 "from (default: the plan's)."),
           device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu or cuda."),
           timeout_s: float = typer.Option(300.0, "--timeout-s", help="Process-group timeout in seconds."),
           inject_failure: Optional[str] = typer.Option(None, "--inject-failure", hidden=True,
                                                        help="Testing: RANK:UNIT fails in that unit's forward "
                                                        "(RANK:UNIT:kill: by SIGKILL).")) -> None:
    """Replay a plan for real under torchrun: units in the plan's order, context parallelism over
    P2P, one gradient all-reduce per step. Arguments it does not know go to torchrun, e.g.
    `--nnodes 2 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id JOB` for a
    multi-node job; without them the job is standalone on this machine."""
    opts = ReplayOptions(plan_path=plan, model=model, steps=steps, check=check, trace_path=trace, cp_impl=cp,
                         ring_kernel=ring_kernel, seed=seed, optimizer=optimizer, lr=lr, tokens_path=tokens,
                         device=device, timeout_s=timeout_s, dtype=dtype, recompute=recompute, hf_config=hf_config,
                         hf_weights=hf_weights, plan_ahead=plan_ahead, lengths=lengths,
                         inject_failure=InjectedFailure.parse(inject_failure) if inject_failure else None)
    try:
        run_replay(opts, nproc, ctx.args)  # checks the plan before any process starts
    except ReplayFailure as e:
        fail(f"replay failed: {e}", code=e.exit_code)


# -- plan / simulate: the planner ------------------------------------------------------------------
from planner.api import PlanRequest, compare as compare_strategies, cost_model_for_plan, device_kind  # noqa: E402
from planner.plan import PlanError as _PlanError  # noqa: E402
from planner.plan.stream import load_plan, save_plan  # noqa: E402
from planner.strategies import (HEURISTICS, PP_SCHEDULES, SOLVERS, STRATEGIES, HdpOptions, IlpOptions,  # noqa: E402
                                PlanOptions)
from planner.strategies.cp_kinds import AUTO as CP_KINDS_AUTO, CP_KINDS, parse_cp_kinds  # noqa: E402

USER_ERRORS += (_PlanError,)


_HDP, _ILP = HdpOptions(), IlpOptions()  # the plan command's flag defaults are the options' own


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


# Training flags shared by `plan` and the what-if commands (planner.studies.TrainingFlags): one definition each.
_OPT_MOE_CAPACITY_FACTOR = typer.Option(1.0, "--moe-capacity-factor", min=1.0,
                                        help="MoE routing imbalance: the busiest expert's tokens over the "
                                        "mean (1: balanced).")
_OPT_MOE_GROUPED_GEMM = typer.Option(False, help="MoE: a rank's local experts in one grouped GEMM (default: "
                                     "one GEMM per expert, Megatron's SequentialMLP).")
_OPT_MOE_DISPATCHER = typer.Option("alltoall", "--moe-dispatcher", help="MoE with --ep: how tokens travel, "
                                   f"{one_of(MOE_DISPATCHERS)} (Megatron-core's: NCCL all-to-alls; flex, DeepEP, "
                                   "which crosses the network once per node a token goes to; hybridep, the flex "
                                   "dispatcher on HybridEP: the same path on fewer SMs, with receive buffers "
                                   "for the worst case, about ep x 2h bytes a token; a plan's EP lies in its TP "
                                   "group, inside one node, where their transfers price alike).")
_OPT_EP_COMM_OVERLAP = typer.Option(False, "--ep-comm-overlap", help="MoE with --ep: Megatron-core's "
                                    "overlap_moe_expert_parallel_comm, each dispatch and combine under "
                                    "another micro-batch's compute.")
_OPT_DTYPE = typer.Option("bf16", help=f"Training precision, {one_of(TRAIN_DTYPES)}; fp8: the layers' GEMMs "
                          "in fp8 (Transformer Engine), attention and storage bf16.")
_OPT_FP8_RECIPE = typer.Option(None, "--fp8-recipe", help=f"--dtype fp8's scaling, "
                               f"{one_of(FP8_RECIPES)} (Megatron's --fp8-recipe; default: "
                               "Transformer Engine's for the GPU, mxfp8 on Blackwell, else "
                               "delayed).")
_OPT_TP_COMM_OVERLAP = typer.Option(False, "--tp-comm-overlap", help="Megatron-core's TP communication "
                                    "overlap (Transformer Engine userbuffers; needs SP): each TP "
                                    "collective runs under its GEMM.")
_OPT_SEQUENCE_PARALLEL = typer.Option(True, "--sequence-parallel/--no-sequence-parallel", help="With --tp: "
                                      "Megatron's sequence parallelism (norms, dropout and residuals on 1/tp of the "
                                      "tokens; each TP all-reduce split into an all-gather and a reduce-scatter). "
                                      "Without it they run replicated and the TP collectives are all-reduces, as in "
                                      "Megatron-LM without --sequence-parallel and in `meshplan replay`.")
_OPT_OVERLAP_GRAD_REDUCE = typer.Option(False, "--overlap-grad-reduce", help="Megatron-core DDP: the "
                                        "gradient reduction runs in buckets under the last backward.")
_OPT_OVERLAP_PARAM_GATHER = typer.Option(False, "--overlap-param-gather", help="Megatron-core DDP: the "
                                         "distributed optimizer's all-gather runs under the next "
                                         "forward.")
_OPT_FP8_PARAM_GATHER = typer.Option(False, "--fp8-param-gather", help="Megatron-LM's fp8 weights (--dtype "
                                     "fp8, --zero 1 or 2): no bf16 copy of the fp8 GEMMs' weights, "
                                     "gathered in fp8.")
_OPT_OPTIMIZER_MOMENTS = typer.Option("fp32", "--optimizer-moments", help=f"Adam's moments, "
                                      f"{one_of(OPTIMIZER_MOMENTS)}: bf16 is Megatron-core's precision-aware optimizer "
                                      "(--use-precision-aware-optimizer --exp-avg-dtype bf16 --exp-avg-sq-dtype "
                                      "bf16; the master weights as 16-bit remainders): 6 B of optimizer state a "
                                      "parameter instead of 12, 8 with --fp8-param-gather; bf16 or fp8 training with "
                                      "the distributed optimizer (ZeRO 1 or 2).")
_OPT_MTP_LAYERS = typer.Option(0, "--mtp-layers", min=0, help="Megatron-core's --mtp-num-layers: "
                               "multi-token-prediction depths (DeepSeek-V3 trains 1) on the last pipeline "
                               "stage, each one more layer and LM head.")


@app.command("plan")
def plan_cmd(
        model: str = typer.Option("llama-7b", help="Model preset or config.json path."),
        cluster: str = typer.Option("dgx-h100", help="Cluster preset or JSON path."),
        gpus: int = typer.Option(64, help="GPUs (whole nodes, or part of one)."),
        tp: int = typer.Option(1, help="Tensor-parallel degree."),
        ep: int = typer.Option(1, "--ep", min=1, help="MoE expert-parallel degree, folded into the TP group "
                               "(divides --tp and the experts): all-to-all dispatch instead of the MLP's TP pair."),
        moe_capacity_factor: float = _OPT_MOE_CAPACITY_FACTOR,
        moe_grouped_gemm: bool = _OPT_MOE_GROUPED_GEMM,
        moe_dispatcher: str = _OPT_MOE_DISPATCHER,
        ep_comm_overlap: bool = _OPT_EP_COMM_OVERLAP,
        pp: int = typer.Option(1, help="Pipeline stages."),
        pp_schedule: str = typer.Option(_HDP.pp_schedule, help=f"PP (hdp): {one_of(PP_SCHEDULES)} (1F1B; "
                                        "SlimPipe slices; slices plus mirror pairing where it pays)."),
        pp_v: Optional[int] = typer.Option(None, "--pp-v", min=1, help="PP (hdp): model chunks per stage "
                                           "(interleaving); default: chosen by simulation, one v per plan."),
        redistribute_max_chunks: int = typer.Option(_HDP.redistribute_max_chunks, min=0, help="PP mirror pairing: "
                                                    "most K/V chunks (one slice's each) a stage pair moves per op."),
        profile: Optional[str] = typer.Option(None, help="Profile name or path (default: the cluster's)."),
        lengths: str = typer.Option("byted-like", help="Length source: file or name (see `meshplan lengths`)."),
        steps: int = typer.Option(1, min=1, help="Global batches (steps) to plan."),
        tokens_per_step: str = typer.Option("auto", help="Token budget per step (K/M suffixes). auto: one "
                                            "micro-batch per HDP rank, hdp × min(C, max context) tokens."),
        max_context: str = typer.Option("2M", help="Longest sequence; longer documents are split."),
        recompute: str = typer.Option(AUTO_RECOMPUTE, help=RECOMPUTE_HELP),
        recompute_modules: Optional[str] = typer.Option(None, "--recompute-modules", help=RECOMPUTE_MODULES_HELP),
        capacity: Optional[str] = typer.Option(None, help="Override the per-rank token capacity C."),
        dtype: str = _OPT_DTYPE,
        fp8_recipe: Optional[str] = _OPT_FP8_RECIPE,
        tp_comm_overlap: bool = _OPT_TP_COMM_OVERLAP,
        sequence_parallel: bool = _OPT_SEQUENCE_PARALLEL,
        overlap_grad_reduce: bool = _OPT_OVERLAP_GRAD_REDUCE,
        overlap_param_gather: bool = _OPT_OVERLAP_PARAM_GATHER,
        fp8_param_gather: bool = _OPT_FP8_PARAM_GATHER,
        mtp_layers: int = _OPT_MTP_LAYERS,
        optimizer_moments: str = _OPT_OPTIMIZER_MOMENTS,
        attention_kernel: str = typer.Option("flash", "--attention-kernel", help=f"Attention kernel the training "
                                             f"runs, {one_of(ATTENTION_KERNELS)}: flash is the profile's own table; "
                                             "fa2, fa3 and cudnn-2024 their published H100 rates over it (analytic "
                                             "Hopper profiles; fa2 is the A100 profiles' own), fa1 and fa1-triton the "
                                             "FA2 paper's A100 ratios over FA2 (analytic A100 profiles); unfused "
                                             "materialises the scores."),
        loss: str = typer.Option("online", "--loss", help=f"Cross-entropy the training runs, {one_of(LOSS_KERNELS)}: "
                                 "online holds one 8K-token chunk's fp32 logits (ByteScale); in_place every token's "
                                 "logits in their dtype, the gradient written over them (Transformer Engine's, "
                                 "Megatron's cross_entropy_fusion_impl te); fp32 every token's fp32 logits and "
                                 "softmax (Megatron's vocab_parallel_cross_entropy)."),
        grad_accumulation: Optional[str] = typer.Option(
            None, "--grad-accumulation", help=f"How micro-batches' weight gradients accumulate, "
            f"{one_of(GRAD_ACCUMULATIONS)}: fused in the GEMM (Megatron-core's gradient_accumulation_fusion); add, a "
            "separate add per micro-batch (Megatron without the fusion); cast_add, a cast then the add (DeepSpeed's "
            "BF16 optimizer, torch autograd under autocast). Default: fused, or the replay's own with --kernels "
            "eager."),
        zero: int = typer.Option(1, "--zero", min=0, max=3, help="ZeRO stage over the HDP ranks of a stage: 0 "
                                 "replicated, 1 optimizer sharded, 2 + gradients, 3 + parameters (FSDP2: per-layer "
                                 "all-gathers and reduce-scatters, the step run in rounds; pp 1)."),
        kernels: str = typer.Option("fused", help="Elementwise kernels the training runs: fused (Megatron-LM, "
                                    "Transformer Engine) or eager (one kernel per PyTorch op, unfused loss: "
                                    "`meshplan replay`, HF transformers without torch.compile)."),
        offload: bool = typer.Option(True, help="Selective activation offloading (hdp strategies)."),
        cp_kinds: str = typer.Option("", "--cp-kinds", help="Context-parallel kinds each sharded unit may take, "
                                     f"chosen per unit by predicted time and memory: {CP_KINDS_AUTO}, or a comma "
                                     f"list of {','.join(CP_KINDS)} (default: the plan-wide ring only)."),
        strategy: Optional[str] = typer.Option(None, help=f"Write this strategy's plan ({', '.join(STRATEGIES)}); "
                                               "default: the fastest of those compared."),
        compare: str = typer.Option(",".join(HEURISTICS), help="Strategies in the comparison table (add ilp to "
                                    "solve exactly)."),
        solver: str = typer.Option(_ILP.solver, help=f"ilp: solver backend, {one_of(SOLVERS)}."),
        time_limit: float = typer.Option(_ILP.time_limit_s, "--time-limit", min=0.1,
                                         help="ilp: seconds per step, the whole strategy call (the solver's log: "
                                         "MESHPLAN_SOLVER_LOG=1, on stderr)."),
        deterministic: bool = typer.Option(_ILP.deterministic, "--deterministic",
                                           help="ilp: stop each phase at work limits sized for part of --time-limit "
                                           "on an idle core, not at times: the same plan on a busy machine."),
        out_path: Path = typer.Option(Path("plan.json"), "--out", help="Where the plan is written: one JSON "
                                      "object, or with a .jsonl suffix a plan stream (one line per step, an "
                                      "index: a replay rank reads only its step)."),
        trace: Optional[Path] = typer.Option(None, help="Also write a Chrome/Perfetto trace of the plan."),
        seed: int = typer.Option(0, help="Seed of the length source."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Plan training steps, compare strategies, and write the fastest one's plan.json (or --strategy's)."""
    names = [x.strip() for x in compare.split(",") if x.strip()]
    for n in names + ([strategy] if strategy else []):
        if n not in STRATEGIES:
            fail(f"unknown strategy {n!r}; one of {', '.join(STRATEGIES)}")
    if strategy and strategy not in names:
        names.append(strategy)
    if not names:
        fail(f"--compare: give at least one of {', '.join(STRATEGIES)}")
    writable(out_path, "--out")
    writable(trace, "--trace")
    if trace is not None and trace.absolute() == out_path.absolute():
        fail(f"--trace {trace}: the same file as --out")
    check_choice("--solver", solver, SOLVERS)
    check_choice("--pp-schedule", pp_schedule, PP_SCHEDULES)
    flags = _training_flags(dtype, fp8_recipe, moe_capacity_factor, moe_grouped_gemm, moe_dispatcher, ep_comm_overlap,
                            tp_comm_overlap, overlap_grad_reduce, overlap_param_gather, fp8_param_gather, mtp_layers,
                            optimizer_moments, sequence_parallel)
    check_choice("--kernels", kernels, KERNELS)
    check_choice("--attention-kernel", attention_kernel, ATTENTION_KERNELS)
    check_choice("--loss", loss, LOSS_KERNELS)
    if grad_accumulation is not None:
        check_choice("--grad-accumulation", grad_accumulation, GRAD_ACCUMULATIONS)
    modules = recompute_modules_arg(recompute_modules)
    try:
        kinds = parse_cp_kinds(cp_kinds) if cp_kinds.strip() else ()
    except _PlanError as e:
        fail(str(e))
    req = PlanRequest(model=model, cluster=cluster, gpus=gpus, tp=tp, pp=pp, profile=profile, lengths=lengths,
                      steps=steps, tokens_per_step=None if tokens_per_step.strip().lower() == "auto"
                      else parse_tokens(tokens_per_step),
                      max_context_tokens=parse_tokens(max_context), recompute=recompute,
                      recompute_modules=modules,
                      capacity_tokens=parse_tokens(capacity) if capacity else None, zero_stage=zero,
                      kernels=kernels, ep=ep, **dataclasses.asdict(flags), attention_kernel=attention_kernel,
                      loss=loss, grad_accumulation=grad_accumulation, seed=seed,
                      options=PlanOptions(offload=offload, seed=seed, cp_kinds=kinds,
                                          hdp=HdpOptions(pp_schedule=pp_schedule, pp_v=pp_v,
                                                         redistribute_max_chunks=redistribute_max_chunks),
                                          ilp=IlpOptions(solver=solver, time_limit_s=time_limit,
                                                         deterministic=deterministic)))
    import warnings

    from rich.progress import Progress

    with Progress(console=err, transient=True, disable=as_json) as prog, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = prog.add_task("planning", total=len(names))
        res = compare_strategies(req, names, progress=lambda n: prog.update(task, advance=1, description=n))
    for w in caught:  # e.g. the exact solver fell back to the heuristic's plan
        err.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False, soft_wrap=True)
    choice = res.chosen(strategy)
    plan = res.plans[choice.strategy]
    if trace:  # first: a trace that cannot be written leaves no plan behind (both writes are atomic)
        from planner.simulate import simulate_step

        simulate_step(plan.steps[0], res.cost_model).write_trace(trace)
    save_plan(plan, out_path)
    if as_json:
        sys.stdout.write(json.dumps({"plan": str(out_path), "strategy": choice.strategy, "reason": choice.reason,
                                     "trace": None if trace is None else str(trace),
                                     "summary": [x.to_dict() for x in res.summaries],
                                     "failures": res.failures}) + "\n")
        return
    cm = res.cost_model
    su = cm.setup
    out.print(f"[bold]{escape(su.model.name)}[/] on {su.cluster.world_size} x {escape(su.cluster.gpu)} "
              f"({escape(su.cluster.name)}), tp={su.training.tp} pp={su.training.pp} hdp={su.hdp}"
              + (f" ep={su.training.ep} cf={su.training.moe_capacity_factor:g}" if su.model.is_moe else "")
              + (f" {su.training.moe_dispatcher}" if su.training.moe_dispatcher != "alltoall" else "")
              + (" ep-overlap" if su.training.ep_comm_overlap else "") + ", "
              f"recompute={su.training.recompute}"
              + (f" ({','.join(su.training.recompute_modules)})" if su.training.recompute_modules else "")
              + f", zero={su.training.zero_stage}"
              + (f" ({su.training.optimizer_moments} moments)" if su.training.optimizer_moments != "fp32" else "")
              + f", C={cm.capacity_tokens} tokens/rank, "
              f"profile {escape(cm.profile.fingerprint.name)}")
    b = res.batches
    out.print(f"{len(b)} step(s) of {escape(lengths)}: {sum(len(x.lengths_tokens) for x in b)} sequences, "
              f"{sum(x.total_tokens for x in b)} tokens, longest {max(int(x.lengths_tokens.max()) for x in b)}"
              + (f", {sum(x.split_documents for x in b)} document(s) split at the max context"
                 if any(x.split_documents for x in b) else ""))
    t = Table(title="predicted per step (mean over steps)")
    for c in ("strategy", "step time (s)", "/ lower bound", "tokens/s", "MFU", "speedup vs static",
              "busiest rank (s)", "idlest rank (s)", "peak mem (GB)", "plan time (s)"):
        t.add_column(c, justify="left" if c == "strategy" else "right")
    for x in res.summaries:
        t.add_row(x.strategy + (" *" if x.strategy == choice.strategy else ""), f"{x.step_time_s:.2f}",
                  f"{x.step_time_s / x.lower_bound_s:.2f}", f"{x.tokens_per_s:,.0f}", f"{x.mfu:.1%}",
                  "-" if x.speedup_vs_static is None else f"{x.speedup_vs_static:.2f}x",
                  f"{x.busiest_rank_s:.2f}", f"{x.idlest_rank_s:.2f}",
                  _gb(x.peak_memory_bytes) + ("" if x.fits_hbm else " †"), f"{x.planning_s:.2f}")
    for n, why in res.failures.items():
        t.add_row(n, "infeasible", "", "", "", "", "", "", "", "", style="dim")
        err.print(f"[yellow]{n}:[/] {escape(why)}", soft_wrap=True)
    out.print(t)
    for n, p in res.plans.items():  # exact solvers: how sure the answer is
        sv = p.meta["solver"]
        if sv["status"] != "heuristic":
            gap = "-" if sv["gap"] is None else f"{sv['gap']:.2%}"
            out.print(f"{n}: {sv['name']} {sv['status']}, gap {gap} (within the partition model), "
                      f"{sv['seconds']:.1f} s")
    out.print(f"MFU: causal attention halved, recompute excluded, peak {cm.peak_flops() / 1e12:.3g} TFLOP/s.")
    if not all(x.fits_hbm for x in res.summaries):
        out.print(f"†: simulated peak over the {cm.budget.hbm_bytes / 1e9:.4g} GB HBM (fragmentation reserve "
                  "included); such a plan is never written.")
    out.print(escape(f"* wrote {out_path}: {choice.strategy}, {choice.reason}" + (f"; trace {trace}" if trace else "")),
              highlight=False)


@app.command("simulate")
def simulate_cmd(
        plan_path: Path = typer.Argument(..., help="A plan.json written by `meshplan plan`."),
        profile: Optional[str] = typer.Option(None, help="Re-simulate on another profile."),
        trace: Optional[Path] = typer.Option(None, help="Write a Chrome/Perfetto trace of step 0."),
        measured: Optional[Path] = typer.Option(None, help="A `meshplan replay --trace` file: predicted vs measured."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="With --measured: draw predicted against measured "
                                            "per step and per unit (and the units' CPU where the trace has it), "
                                            "PNG and SVG."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Re-simulate a plan: step time, breakdown, busiest and idlest ranks, peak memory."""
    from planner.plan import validate
    from planner.simulate import simulate_plan

    writable(trace, "--trace")
    writable_figure(plot, "--plot")
    if plot is not None and measured is None:
        fail("--plot draws predicted against measured times: give the replay's trace with --measured")
    plan = load_plan(plan_path)
    validate(plan)
    cm = cost_model_for_plan(plan, profile)
    sims = simulate_plan(plan, cm)
    if trace:
        sims[0].write_trace(trace)
    rows = [{"step": x.step, "step_time_s": x.step_time_s, "lower_bound_s": x.lower_bound_s,
             "busiest_rank_s": max(x.per_rank_busy_s), "idlest_rank_s": min(x.per_rank_busy_s),
             "peak_memory_bytes": max(x.peak_memory_bytes), "breakdown": x.breakdown} for x in sims]
    comparison, figures = None, []
    if measured is not None:
        import warnings

        from planner.runtime.launch import pricing_differences
        from planner.simulate import compare_measured, read_measured_trace

        for why in pricing_differences(plan):  # the trace ran what the plan did not price
            warnings.warn(f"{plan_path}: {why} to compare its predicted times with the replay's")
        comparison = compare_measured(plan, cm, read_measured_trace(measured))
        if plot is not None:
            figures = _plot_measured(comparison, plot,
                                     f"{plan_path.name} on {cm.profile.fingerprint.name} vs {measured.name}")
    if as_json:
        load = comparison and comparison.other_load
        extra = {} if comparison is None else {"measured": {
            "units": comparison.units, "steps": comparison.steps, "ops": comparison.ops,
            "host_slowdown": comparison.host_slowdown, "other_load": dataclasses.asdict(load) if load else None}}
        sys.stdout.write(json.dumps({"plan": str(plan_path), "profile": cm.profile.fingerprint.name,
                                     "steps": rows, **extra}) + "\n")
        return
    if comparison is not None:
        slow = comparison.host_slowdown
        t = Table(title=escape(f"predicted ({cm.profile.fingerprint.name}) vs measured ({measured})"))
        # traces with the units' CPU: the members' own-thread CPU against the priced compute (CPU profiles), which
        # waits and time slicing do not move, and their other threads' (gloo's) CPU
        cpu = any("thread_cpu_s" in x for x in comparison.units)
        for c in ("step", "unit", "predicted (s)", "measured (s)", "error") + (
                ("own CPU (s)", "CPU error", "other threads' CPU (s)") if cpu else ()):
            t.add_column(c, justify="right")

        def row(x: dict, unit: str) -> tuple[str, ...]:
            cells = (str(x["step"]), unit, f"{x['predicted_s']:.4f}", f"{x['measured_s']:.4f}", f"{x['rel_err']:+.1%}")
            if not cpu:
                return cells
            return cells + ((f"{x['thread_cpu_s']:.4f}", f"{x['cpu_err']:+.1%}" if "cpu_err" in x else "-",
                             f"{x['helper_cpu_s']:.4f}") if "thread_cpu_s" in x else ("", "", ""))

        for x in comparison.steps:
            t.add_row(*row(x, "step"))
        for x in comparison.units:
            t.add_row(*row(x, f"{x['unit']} (stage {x['stage']})" if plan.mesh.pp > 1 else str(x["unit"])))
        out.print(t)
        out.print(f"median |error| per unit: {comparison.median_abs_unit_err:.1%}")
        if cpu_errs := [abs(x["cpu_err"]) for x in comparison.units if "cpu_err" in x]:
            out.print(f"median |CPU error| per unit: {statistics.median(cpu_errs):.1%} (own-thread CPU against the "
                      "priced compute at the cores' share)")
        if comparison.ops:
            out.print(f"median |CPU error| per pipeline op: "
                      f"{statistics.median(abs(x['cpu_err']) for x in comparison.ops):.1%} (its slice's share; "
                      "`--json` lists them)")
        if slow:
            out.print(f"host probe: {slow:.2f}x its time while the profile was measured (1: the host computed as fast; "
                      "other load on the machine moves it)")
        if (load := comparison.other_load) is not None:
            during = "" if load.profile_cores is None else f", {load.profile_cores:.2f} while the profile was measured"
            out.print(f"other processes: {load.replay_cores:.2f} cores busy during the steps (median; hypervisor "
                      f"steal {load.steal_cores:.2f}){during}")
    t = Table(title=escape(f"{plan_path} ({plan.meta.get('strategy')}) on {cm.profile.fingerprint.name}"))
    for c in ["step", "step time (s)", "/ LB", "busiest (s)", "idlest (s)", "peak mem (GB)"]:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(str(r["step"]), f"{r['step_time_s']:.3f}", f"{r['step_time_s'] / r['lower_bound_s']:.2f}",
                  f"{r['busiest_rank_s']:.3f}", f"{r['idlest_rank_s']:.3f}", _gb(r["peak_memory_bytes"]))
    out.print(t)
    # the breakdown is a table of its own: 13 columns in one would not fit a terminal
    keys = list(rows[0]["breakdown"]) if rows else []
    t = Table(title="breakdown: seconds per rank (mean over ranks)")
    for c in ["step"] + [k.replace("_", " ") for k in keys]:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(str(r["step"]), *[f"{r['breakdown'][k]:.3f}" for k in keys])
    out.print(t)
    if trace:
        out.print(escape(f"trace written to {trace}"), highlight=False)
    wrote_figure(figures)


def _plot_measured(comparison, path: Path, title: str) -> list[Path]:
    """simulate --measured --plot: steps, units and (traces that have it) the units' own CPU, each a group."""
    from planner.report import Comparison, plot_accuracy

    groups = [g for g in (Comparison.from_rows("steps", comparison.steps),
                          Comparison.from_rows("units", comparison.units),
                          Comparison.from_rows("units' own CPU", comparison.units, "thread_cpu_s", "predicted_cpu_s"))
              if g.measured_s]
    if not groups:
        fail(f"--plot: the trace has no measured time to draw ({len(comparison.steps)} steps)")
    return plot_accuracy(groups, path, title=title, measured_label="measured")


# -- profile: measured profiles ----------------------------------------------------------------------
from costmodel.timing import fit_models, profile_gemm_shapes  # noqa: E402
from profiles.measure import TABLES as _PROFILE_TABLES, MeasureError  # noqa: E402

# TP degrees whose sharded GEMM shapes a profile measures (those dividing a model's KV heads)
PROFILE_TP_QUICK, PROFILE_TP_FULL = (1, 2), (1, 2, 4, 8)

USER_ERRORS += (MeasureError,)


def _notes(notes: list[str]) -> None:
    """The library's notes (e.g. a model the profile cannot fit), one `note:` line each on stderr."""
    for note in notes:
        err.print(f"note: {note}", highlight=False, markup=False)


def _profile_post(p, specs: dict) -> None:
    """After the tables: each model's T(s) fit, and on CPU the executor's cost per attention call, per K/V source
    of a sliced forward and per ring step (planner/runtime/call_overhead.py), measured at the first model's heads: on
    a CPU the host's work is the step's."""
    _notes(fit_models(p, specs))
    if specs and len(p.tables["attention"]) and device_kind(p.fingerprint.device) == "cpu":
        from planner.runtime.call_overhead import (attention_call_overhead, attention_source_overhead,
                                                   ring_step_overhead)
        m = next(iter(specs.values()))
        heads = (m.heads, m.kv_heads, m.head_dim)
        for what, measure in (
                ("attention call", lambda: {"attn_call_overhead_s": attention_call_overhead(*heads)}),
                ("sliced attention source", lambda: attention_source_overhead(*heads)),
                ("ring step", lambda: ring_step_overhead(*heads))):
            try:
                p.constants.update(measure())
            except Exception as e:  # noqa: BLE001 -- a refinement: its failure must not lose the measured tables
                _notes([f"no {what} cost measured ({type(e).__name__}: {e}); the profile is written without it"])


def _profile_id(p) -> dict:
    fp = p.fingerprint
    return {"name": fp.name, "source": fp.source, "device": fp.device, "sha256": fp.sha256}


def _print_comparison(a: str, b: str, as_json: bool = False) -> None:
    from profiles.measure.runner import compare_constants, compare_profiles
    pa, pb = load_profile(a), load_profile(b)
    cmps, consts = compare_profiles(pa, pb), compare_constants(pa, pb)
    if as_json:
        tables = [{"table": c.table, "quantity": f"A/B of {c.quantity}", "note": c.note,
                   "summary": [] if c.summary.empty else
                   json.loads(c.summary.to_json(orient="records", double_precision=15))} for c in cmps]
        sys.stdout.write(json.dumps({"a": _profile_id(pa), "b": _profile_id(pb), "tables": tables,
                                     "constants": json.loads(consts.to_json(orient="records", double_precision=15))})
                         + "\n")
        return
    out.print(f"A = {pa.fingerprint.name} ({pa.fingerprint.source}, {pa.fingerprint.device})\n"
              f"B = {pb.fingerprint.name} ({pb.fingerprint.source}, {pb.fingerprint.device})", highlight=False,
              markup=False)
    for c in cmps:
        title = f"{c.table}: A/B of {c.quantity}" + (f" ({c.note})" if c.note else "")
        if c.summary.empty:
            out.print(f"[bold]{c.table}[/]: {c.note or 'nothing to compare'}")
            continue
        t = Table(title=title)
        for col in c.summary.columns:
            t.add_column(col, justify="left" if c.summary[col].dtype == object else "right")
        for row in c.summary.itertuples(index=False):
            t.add_row(*[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row])
        out.print(t)
    if len(consts):  # "-": the profile lacks it (a kind it lacks is priced as streaming, ratio 1)
        t = Table(title="constants: A, B, A/B")
        for col in consts.columns:
            t.add_column(col, justify="left" if col in ("constant", "unit") else "right")
        for row in consts.itertuples(index=False):
            t.add_row(*[("-" if math.isnan(v) else f"{v:.4g}") if isinstance(v, float) else str(v) for v in row])
        out.print(t)


@contextmanager
def _table_progress():
    """One rich bar per profile table on stderr, fed by the runner's progress callback; drawn from the
    first table on, so a run that measures nothing prints nothing."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    prog = Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err)
    tasks: dict[str, int] = {}

    def progress(table: str, done: int, total: int, resumed: bool) -> None:
        if not tasks:
            prog.start()
        if table not in tasks:
            tasks[table] = prog.add_task(table + (" (resumed)" if resumed else ""), total=total, completed=done)
        else:
            prog.update(tasks[table], completed=done, total=total)

    try:
        yield progress
    finally:
        if tasks:
            prog.stop()


@app.command("profile")
def profile_cmd(
        out_path: Optional[Path] = typer.Option(None, "--out",
                                                help="Profile JSON to write (e.g. profiles/data/NAME.measured.json)."),
        quick: bool = typer.Option(False, "--quick", help="Small grids and few repeats (minutes on a CPU)."),
        ops: str = typer.Option(",".join(_PROFILE_TABLES), "--ops", help="Tables to measure, comma-separated."),
        max_bytes: Optional[int] = typer.Option(None, "--max-bytes",
                                                help="Largest collective / host-copy / memory-kernel size in bytes."),
        nproc: Optional[int] = typer.Option(None, "--nproc",
                                            help="Ranks for collectives (default: GPUs, or 4 on CPU)."),
        models: str = typer.Option("tiny", "--models", help="Models whose GEMM shapes (also TP-sharded: quick 2, "
                                   "full 2, 4, 8 where they divide the KV heads), attention head dims and T(s) fits "
                                   "go in; on CPU the first one's heads time the executor's cost per attention call."),
        compare: Optional[tuple[str, str]] = typer.Option(None, "--compare", metavar="A B",
                                                          help="Print A/B ratios table by table and the constants "
                                                               "side by side, no measuring."),
        estimate: Optional[str] = typer.Option(None, "--estimate", metavar="REF",
                                               help="Print how long this run would take, from profile REF's "
                                                    "times (e.g. h100-sxm.analytic with --device cuda); no measuring."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Measure GEMM, attention, collective, host-copy and memory tables on this machine into a profile
    (Ctrl-C keeps what was measured: rerun the same command to resume), compare two profiles, or
    estimate a run's duration."""
    if compare:
        _print_comparison(*compare, as_json=as_json)
        return
    from profiles.measure.runner import ProfileRequest, estimate_request, plan_counts, resume_hint, run_profile
    specs = {name: load_model(name) for name in models.split(",") if name}
    req = ProfileRequest(out=out_path or Path("estimate.json"), quick=quick,
                         ops=tuple(o for o in ops.split(",") if o), max_bytes=max_bytes, nproc=nproc,
                         model_shapes=profile_gemm_shapes(specs, PROFILE_TP_QUICK if quick else PROFILE_TP_FULL),
                         device=device,
                         model_head_dims=tuple(sorted({round(m.attn_head_dim) for m in specs.values()})))
    if estimate:
        cfg, est = estimate_request(req, load_profile(estimate))
        counts = plan_counts(cfg)
        if as_json:
            sys.stdout.write(json.dumps({
                "reference": estimate, "device": cfg.device, "nproc": cfg.nproc, "quick": quick,
                "tables": {k: {"points": counts.get(k), "seconds": v, "skipped": k != "fixed" and not v}
                           for k, v in est.items()},
                "total_s": sum(est.values())}) + "\n")
            return
        t = Table(title=f"estimated {'quick' if quick else 'full'} profile on {cfg.device} x{cfg.nproc} "
                        f"from {estimate}")
        for c in ("table", "points", "seconds"):
            t.add_column(c, justify="right" if c != "table" else "left")
        for k, v in est.items():
            t.add_row(k, str(counts.get(k, "")) if v or k == "fixed" else "skipped", f"{v:.0f}")
        t.add_row("total", "", f"{sum(est.values()):.0f}")
        out.print(t)
        return
    if out_path is None:
        fail("give --out FILE to measure, --compare A B to compare two profiles, or --estimate REF")
    try:
        with _table_progress() as progress:
            res = run_profile(req, post=lambda p: _profile_post(p, specs), progress=progress,
                              on_note=lambda note: _notes([note]))
    except KeyboardInterrupt:
        fail(resume_hint(out_path), code=130)
    p = res.profile
    peak_flops = p.constants.get("peak_bf16_flops", {}).get("value")
    if as_json:
        sys.stdout.write(json.dumps({
            "out": str(out_path), "name": p.fingerprint.name, "device": p.fingerprint.device,
            "sha256": p.fingerprint.sha256, "total_s": res.total_s, "peak_flops": peak_flops,
            "fits": sorted(p.fits),
            "tables": {name: {"rows": len(df), "seconds": res.seconds.get(name, 0.0), "resumed": name in res.resumed}
                       for name, df in p.tables.items() if len(df)}}) + "\n")
        return
    t = Table(title=f"{out_path} ({p.fingerprint.device})")
    for c in ("table", "rows", "seconds"):
        t.add_column(c, justify="right" if c != "table" else "left")
    for name, df in p.tables.items():
        if len(df):
            t.add_row(name, str(len(df)), "resumed" if name in res.resumed else f"{res.seconds.get(name, 0):.1f}")
    out.print(t)
    peak = "none (no GEMM table)" if peak_flops is None else f"{peak_flops / 1e9:.1f} GFLOP/s"
    out.print(f"total {res.total_s:.1f} s; peak (measured) {peak}; "
              f"fits: {', '.join(p.fits) or 'none'}; sha256 {p.fingerprint.sha256}", highlight=False, markup=False)


# -- whatif / report: capacity studies, plots and reports (planner/studies, planner/report) ------
from planner.studies import (CALIBRATION_SETS, FACETS, STATIC_MESHES, LayoutRules as _LayoutRules,  # noqa: E402
                            SweepSpec as _SweepSpec, TrainingFlags, facet_errors,
                            Target as _Target,
                            capacity_search as _capacity_search, default_capacity_table as _default_capacity_table,
                            journal_path as _journal_path, json_row as _json_row, read_table as _read_table,
                            run_sweep as _run_sweep, variant_label)

whatif_app = typer.Typer(cls=_Group, add_completion=False, invoke_without_command=True,
                         help="What-if studies. Without a subcommand: a sweep over model x cluster x GPUs x TP/PP x "
                              "context x lengths x strategy, written as CSV + Parquet (resumable). Subcommands: "
                              "`capacity` (smallest GPU count for a target), `reproduce` (the ByteScale table).")
app.add_typer(whatif_app, name="whatif")


def _csv_list(text: str, what: str) -> list[str]:
    vals = [x.strip() for x in text.split(",") if x.strip()]
    if not vals:
        fail(f"{what}: give at least one value")
    return vals


def _counts(text: str, what: str) -> tuple[int, ...]:
    """Comma list of sizes: plain counts or K/M suffixes (K = 1024)."""
    return tuple(_count(x, what) for x in _csv_list(text, what))


def _count(text: str, what: str) -> int:
    """A positive whole number with an optional binary suffix (K = 1024, M = 1024², G = 1024³), or a float
    such as 2e6 that names one; a one-line error naming the option otherwise."""
    try:
        return parse_tokens(text)
    except SourceError:
        fail(f"{what} {text!r}: give a positive whole number, optionally with a K, M or G suffix (K = 1024, "
             "M = 1024²) or as a float such as 2e6")


def _rate(v: float) -> str:
    return f"{v:,.0f}" if v == v else "-"


@contextmanager
def _progress_bar(total: int, description: str = "planning", enabled: bool = True):
    """A progress bar of planned points on stderr; yields the `on_point` callback of run_sweep."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err, transient=True, disable=not enabled) as prog:
        task = prog.add_task(description, total=total)
        yield lambda point, row: prog.update(task, advance=1, description=escape(point.label))


def _interrupted(out_path: Path) -> None:
    err.print(escape(f"interrupted: finished points are kept in {_journal_path(out_path)}; run the same command "
                     "again to resume"), highlight=False, soft_wrap=True)
    raise typer.Exit(130)


LOSS_HELP = (f"Cross-entropy every point's training runs, {one_of(LOSS_KERNELS)} (see `meshplan plan --help`); "
             "in_place is Megatron with Transformer Engine's loss.")
GRAD_ACCUMULATION_HELP = (f"How every point's micro-batches accumulate weight gradients, {one_of(GRAD_ACCUMULATIONS)}"
                          " (see `meshplan plan --help`); fused is Megatron-core's.")


def _training_flags(dtype: str, fp8_recipe: Optional[str], moe_capacity_factor: float, moe_grouped_gemm: bool,
                    moe_dispatcher: str, ep_comm_overlap: bool, tp_comm_overlap: bool, overlap_grad_reduce: bool,
                    overlap_param_gather: bool, fp8_param_gather: bool, mtp_layers: int,
                    optimizer_moments: str, sequence_parallel: bool) -> TrainingFlags:
    """The training flags `plan` and the what-if commands share, each choice checked (one line, exit 2)."""
    check_choice("--dtype", dtype, TRAIN_DTYPES)
    if fp8_recipe is not None:
        check_choice("--fp8-recipe", fp8_recipe, FP8_RECIPES)
    check_choice("--moe-dispatcher", moe_dispatcher, MOE_DISPATCHERS)
    check_choice("--optimizer-moments", optimizer_moments, OPTIMIZER_MOMENTS)
    return TrainingFlags(dtype=dtype, fp8_recipe=fp8_recipe, moe_capacity_factor=moe_capacity_factor,
                         moe_grouped_gemm=moe_grouped_gemm, moe_dispatcher=moe_dispatcher,
                         ep_comm_overlap=ep_comm_overlap, tp_comm_overlap=tp_comm_overlap,
                         overlap_grad_reduce=overlap_grad_reduce, overlap_param_gather=overlap_param_gather,
                         fp8_param_gather=fp8_param_gather, mtp_layers=mtp_layers,
                         optimizer_moments=optimizer_moments, sequence_parallel=sequence_parallel)


@whatif_app.callback()
def whatif_sweep(
        ctx: typer.Context,
        model: str = typer.Option("llama-7b", help="Model presets or config paths, comma-separated."),
        cluster: str = typer.Option("dgx-h100", help="Cluster presets, comma-separated."),
        gpus: str = typer.Option("256,512", help="GPU counts, comma-separated (plain or K suffix)."),
        context: str = typer.Option("256K,1M", help="Max contexts, comma-separated (K/M suffixes or counts)."),
        lengths: str = typer.Option("byted-like", help="Length sources, comma-separated (see `meshplan lengths`)."),
        strategies: str = typer.Option("static,hdp", help=f"Strategies, comma-separated: {', '.join(STRATEGIES)}."),
        tp: str = typer.Option("1", help="TP degrees, comma-separated."),
        ep: int = typer.Option(1, "--ep", min=1, help="MoE expert parallelism, folded into the TP group: each "
                               "point takes min(ep, tp)."),
        pp: str = typer.Option("1", help="PP degrees, comma-separated (1F1B)."),
        steps: int = typer.Option(2, min=1, help="Sampled global batches planned per point."),
        tokens_per_step: str = typer.Option("32M", help="Token budget per step (ByteScale: 32M)."),
        seed: int = typer.Option(0, help="Seed of the length sources."),
        recompute: str = typer.Option(AUTO_RECOMPUTE, help=RECOMPUTE_HELP),
        recompute_modules: Optional[str] = typer.Option(None, "--recompute-modules", help=RECOMPUTE_MODULES_HELP),
        zero: str = typer.Option("1", "--zero", help="ZeRO stages, comma-separated (0-3; 3: FSDP2, pp 1)."),
        attention_kernel: str = typer.Option("flash", "--attention-kernel", help="Attention kernels, comma-separated "
                                             f"({one_of(ATTENTION_KERNELS)}): flash is the profile's own table; fa2, "
                                             "fa3, cudnn-2024 (analytic Hopper profiles), fa1, fa1-triton (analytic "
                                             "A100 profiles) a published kernel's rate over it, e.g. flash,fa2 to see "
                                             "what FlashAttention-2 costs."),
        loss: str = typer.Option("online", "--loss", help=LOSS_HELP),
        grad_accumulation: str = typer.Option("fused", "--grad-accumulation", help=GRAD_ACCUMULATION_HELP),
        dtype: str = _OPT_DTYPE,
        fp8_recipe: Optional[str] = _OPT_FP8_RECIPE,
        moe_capacity_factor: float = _OPT_MOE_CAPACITY_FACTOR,
        moe_grouped_gemm: bool = _OPT_MOE_GROUPED_GEMM,
        moe_dispatcher: str = _OPT_MOE_DISPATCHER,
        ep_comm_overlap: bool = _OPT_EP_COMM_OVERLAP,
        tp_comm_overlap: bool = _OPT_TP_COMM_OVERLAP,
        sequence_parallel: bool = _OPT_SEQUENCE_PARALLEL,
        overlap_grad_reduce: bool = _OPT_OVERLAP_GRAD_REDUCE,
        overlap_param_gather: bool = _OPT_OVERLAP_PARAM_GATHER,
        fp8_param_gather: bool = _OPT_FP8_PARAM_GATHER,
        mtp_layers: int = _OPT_MTP_LAYERS,
        optimizer_moments: str = _OPT_OPTIMIZER_MOMENTS,
        offload: bool = typer.Option(True, help="Selective activation offloading (hdp strategies)."),
        static_mesh: str = typer.Option("context", help="Static CP sized for the max context (what a static job "
                                        "must do) or per batch's longest sequence ('batch')."),
        out_path: Path = typer.Option(Path("sweep.csv"), "--out", help="Table (CSV, and Parquet beside it); finished "
                                      "points are journaled in STEM.journal.jsonl, so a rerun resumes."),
        report: Optional[Path] = typer.Option(None, "--report", help="Also write report.md, report.html and the "
                                              "figures into this folder."),
        workers: int = typer.Option(1, min=1, help="Processes planning configs in parallel."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Sweep what-if points; every point keeps a row (infeasible ones with their reason)."""
    if ctx.invoked_subcommand is not None:
        return
    check_recompute(recompute)  # every point would fail on it: once, before the sweep
    modules = ",".join(recompute_modules_arg(recompute_modules) or ())
    check_choice("--static-mesh", static_mesh, STATIC_MESHES)
    zeros = _csv_list(zero, "--zero")
    for z in zeros:
        check_choice("--zero", z, ("0", "1", "2", "3"))
    kernels = _csv_list(attention_kernel, "--attention-kernel")
    for k in kernels:
        check_choice("--attention-kernel", k, ATTENTION_KERNELS)
    check_choice("--loss", loss, LOSS_KERNELS)
    check_choice("--grad-accumulation", grad_accumulation, GRAD_ACCUMULATIONS)
    flags = _training_flags(dtype, fp8_recipe, moe_capacity_factor, moe_grouped_gemm, moe_dispatcher, ep_comm_overlap,
                            tp_comm_overlap, overlap_grad_reduce, overlap_param_gather, fp8_param_gather, mtp_layers,
                            optimizer_moments, sequence_parallel)
    spec = _SweepSpec(models=tuple(_csv_list(model, "--model")), clusters=tuple(_csv_list(cluster, "--cluster")),
                      gpus=_counts(gpus, "--gpus"), tps=_counts(tp, "--tp"), pps=_counts(pp, "--pp"), ep=ep,
                      contexts_tokens=_counts(context, "--context"), lengths=tuple(_csv_list(lengths, "--lengths")),
                      strategies=tuple(_csv_list(strategies, "--strategies")), steps=steps,
                      tokens_per_step=_count(tokens_per_step, "--tokens-per-step"), seed=seed, recompute=recompute,
                      offload=offload, static_mesh=static_mesh, zero_stages=tuple(map(int, zeros)),
                      attention_kernels=tuple(kernels), loss=loss, grad_accumulation=grad_accumulation,
                      recompute_modules=modules, flags=flags)
    points = spec.points()
    try:
        with _progress_bar(len(points), enabled=not as_json) as on_point:
            res = _run_sweep(points, out_path, workers=workers, on_point=on_point)
    except KeyboardInterrupt:
        _interrupted(out_path)
    md = None
    if report is not None:
        from planner.report import write_sweep_report

        md = write_sweep_report(res.table, report)
    df = res.table
    if as_json:
        sys.stdout.write(json.dumps({"table": [str(p) for p in res.paths], "report": str(md) if md else None,
                                     "computed": res.computed, "reused": res.reused,
                                     "rows": json.loads(df.to_json(orient="records"))}) + "\n")
        return
    t = Table(title=f"what-if sweep: {len(df)} points ({res.computed} planned, {res.reused} from the journal)")
    for c in ("model", "GPUs", "tp/pp", "context", "lengths", "strategy", "tokens/s", "MFU", "step (s)",
              "speedup", "peak GB"):
        t.add_column(c, justify="left" if c in ("model", "lengths", "strategy") else "right")
    for r in df.head(200).itertuples(index=False):
        variant = variant_label(r.zero_stage, r.attention_kernel, r.training)
        strategy = r.strategy + (f" ({variant})" if variant else "")
        if not r.feasible:
            t.add_row(r.model, str(r.gpus), f"{r.tp}/{r.pp}", format_tokens(int(r.context_tokens)), r.lengths,
                      strategy, "infeasible", "", "", "", "", style="dim")
            continue
        t.add_row(r.model, str(r.gpus), f"{r.tp}/{r.pp}", format_tokens(int(r.context_tokens)), r.lengths, strategy,
                  _rate(r.tokens_per_s), f"{r.mfu:.1%}", f"{r.step_time_s:.2f}",
                  "-" if r.speedup_vs_static != r.speedup_vs_static else f"{r.speedup_vs_static:.2f}x",
                  _gb(r.peak_memory_bytes))
    out.print(t)
    for r in df[~df["feasible"]].head(20).itertuples(index=False):
        err.print(f"[yellow]{r.model} {r.gpus} GPUs tp{r.tp} pp{r.pp} {format_tokens(int(r.context_tokens))} "
                  f"{r.lengths} {r.strategy}:[/] {escape(str(r.reason))}", soft_wrap=True)
    out.print(("(first 200 rows shown) " if len(df) > 200 else "") + "MFU: causal attention halved, recompute "
              f"excluded. Wrote {', '.join(str(p) for p in res.paths)}" + (f" and {md}" if md else ""))


@whatif_app.command("capacity")
def whatif_capacity(
        model: str = typer.Option(..., help="Model preset or config path."),
        context: str = typer.Option(..., help="Max context (K/M suffixes), e.g. 1M."),
        target_tokens_per_s: Optional[str] = typer.Option(None, "--target-tokens-per-s", help="Reach at least this "
                                                          "many tokens/s: a number (2000000, 2e6) or K/M suffixed, "
                                                          "binary as everywhere in meshplan (2M = 2 x 1024²)."),
        target_step_time: Optional[float] = typer.Option(None, "--target-step-time",
                                                         help="Reach a step time of at most this many seconds."),
        target_mfu: Optional[float] = typer.Option(None, "--target-mfu", help="Reach at least this MFU (causal "
                                                   "halved): a fraction (0.4) or a percentage (40)."),
        cluster: str = typer.Option("dgx-h100", help="Cluster preset (its node size sets the GPU counts)."),
        lengths: str = typer.Option("byted-like", help="Length source."),
        strategy: str = typer.Option("hdp", help=f"Strategy: {', '.join(STRATEGIES)}."),
        tp: str = typer.Option("1,2,4,8", help="TP degrees the search may use."),
        ep: int = typer.Option(1, "--ep", min=1, help="MoE expert parallelism, folded into the TP group: each "
                               "layout takes min(ep, tp)."),
        pp: str = typer.Option("1,2,4,8", help="PP degrees the search may use (1F1B)."),
        attention_kernel: str = typer.Option("flash", "--attention-kernel", help="Attention kernel the training "
                                             f"runs, {one_of(ATTENTION_KERNELS)}: flash is the profile's own table; "
                                             "fa1, fa1-triton, fa2, fa3, cudnn-2024 a published kernel's rate over "
                                             "it."),
        loss: str = typer.Option("online", "--loss", help=LOSS_HELP),
        grad_accumulation: str = typer.Option("fused", "--grad-accumulation", help=GRAD_ACCUMULATION_HELP),
        dtype: str = _OPT_DTYPE,
        fp8_recipe: Optional[str] = _OPT_FP8_RECIPE,
        moe_capacity_factor: float = _OPT_MOE_CAPACITY_FACTOR,
        moe_grouped_gemm: bool = _OPT_MOE_GROUPED_GEMM,
        moe_dispatcher: str = _OPT_MOE_DISPATCHER,
        ep_comm_overlap: bool = _OPT_EP_COMM_OVERLAP,
        tp_comm_overlap: bool = _OPT_TP_COMM_OVERLAP,
        sequence_parallel: bool = _OPT_SEQUENCE_PARALLEL,
        overlap_grad_reduce: bool = _OPT_OVERLAP_GRAD_REDUCE,
        overlap_param_gather: bool = _OPT_OVERLAP_PARAM_GATHER,
        fp8_param_gather: bool = _OPT_FP8_PARAM_GATHER,
        mtp_layers: int = _OPT_MTP_LAYERS,
        optimizer_moments: str = _OPT_OPTIMIZER_MOMENTS,
        recompute: str = typer.Option(AUTO_RECOMPUTE, help=f"Every layout's recompute: {RECOMPUTE_HELP}"),
        recompute_modules: Optional[str] = typer.Option(None, "--recompute-modules", help=RECOMPUTE_MODULES_HELP),
        min_gpus: Optional[int] = typer.Option(None, help="Smallest GPU count (default: one node)."),
        max_gpus: int = typer.Option(16384, help="Largest GPU count."),
        steps: int = typer.Option(2, min=1, help="Sampled global batches per candidate."),
        tokens_per_step: str = typer.Option("32M", help="Token budget per step."),
        seed: int = typer.Option(0, help="Seed of the length source."),
        best_layout: bool = typer.Option(False, "--best-layout", help="At the answer's GPU count, plan every layout "
                                         "whose bound could beat the best found (slow with PP), not just the first "
                                         "that meets the target."),
        runners_up: int = typer.Option(5, min=0, help="Runners-up to list (from the layouts planned)."),
        workers: int = typer.Option(min(4, os.cpu_count() or 1), min=1, help="Processes planning layouts in "
                                    "parallel."),
        table: Optional[Path] = typer.Option(None, "--table", help="Write every (GPUs, tp, pp) decided as CSV. "
                                             "Planned layouts are journaled in STEM.journal.jsonl beside it (default: "
                                             "a temp folder), so running the same command again resumes."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Smallest GPU count and a parallel layout (tp, pp) that meet a target. GPU counts are one node x 2^k in
    increasing order; at each, every tp x pp allowed by the model and the NVLink domain (same rules at every count).
    Layouts whose step-time lower bound misses the target are not planned; the others are planned cheapest
    first (fewer PP stages). The search stops at the first count where a layout meets the target: every
    smaller count was decided, so that count is minimal. A layout meets the target only when it plans and
    its simulated peak memory fits the HBM."""
    given = [(m, v) for m, v in (("tokens_per_s", target_tokens_per_s), ("step_time_s", target_step_time),
                                 ("mfu", target_mfu)) if v is not None]
    if len(given) != 1:
        fail("give exactly one of --target-tokens-per-s, --target-step-time, --target-mfu")
    metric, value = given[0]
    check_choice("--attention-kernel", attention_kernel, ATTENTION_KERNELS)
    check_choice("--loss", loss, LOSS_KERNELS)
    check_choice("--grad-accumulation", grad_accumulation, GRAD_ACCUMULATIONS)
    check_recompute(recompute)
    modules = ",".join(recompute_modules_arg(recompute_modules) or ())
    flags = _training_flags(dtype, fp8_recipe, moe_capacity_factor, moe_grouped_gemm, moe_dispatcher, ep_comm_overlap,
                            tp_comm_overlap, overlap_grad_reduce, overlap_param_gather, fp8_param_gather, mtp_layers,
                            optimizer_moments, sequence_parallel)
    if metric == "tokens_per_s":
        value = float(_count(value, "--target-tokens-per-s"))
    if metric == "mfu" and value > 1:
        value /= 100.0
    target = _Target(metric, value)
    rules = _LayoutRules(tps=_counts(tp, "--tp"), pps=_counts(pp, "--pp"), min_gpus=min_gpus, max_gpus=max_gpus,
                         ep=ep)
    context_tokens = _count(context, "--context")
    table_path = table or _default_capacity_table()
    journal = _journal_path(table_path)
    try:
        with _capacity_progress(enabled=not as_json) as on_progress:
            res = _capacity_search(model, context_tokens, target, cluster=cluster, lengths=lengths,
                                   strategy=strategy, rules=rules, tokens_per_step=_count(tokens_per_step,
                                                                                          "--tokens-per-step"),
                                   steps=steps, seed=seed, recompute=recompute, attention_kernel=attention_kernel,
                                   loss=loss, grad_accumulation=grad_accumulation, recompute_modules=modules,
                                   flags=flags, runners_up=runners_up, workers=workers,
                                   best_layout=best_layout,
                                   journal=journal, on_progress=on_progress)
    except KeyboardInterrupt:
        _interrupted(table_path)
    if table is not None:
        from profiles.table import atomic_write_text

        atomic_write_text(table, res.table.to_csv(index=False))
    keep = ("gpus", "tp", "pp", "ep", "hdp", "recompute", "recompute_modules", "capacity_tokens", "tokens_per_s", "mfu",
            "mfu_unhalved",
            "step_time_s", "lower_bound_s", "peak_memory_bytes", "status", "reason")
    pick = lambda r: _json_row({k: r.get(k) for k in keep})  # noqa: E731
    statuses = res.table["status"].value_counts().to_dict() if len(res.table) else {}
    if as_json:
        sys.stdout.write(json.dumps({"target": {"metric": target.metric, "value": target.value},
                                     "strategy": strategy, "attention_kernel": attention_kernel, "loss": loss,
                                     "grad_accumulation": grad_accumulation, "recompute": recompute,
                                     "recompute_modules": modules, "training": flags.changed(),
                                     "answer": pick(res.answer) if res.answer else None,
                                     "minimal": res.answer is not None, "best_layout": best_layout,
                                     "runners_up": [pick(r) for r in res.runners_up], "tried": len(res.table),
                                     "statuses": statuses, "planned": res.planned, "reused": res.reused,
                                     "journal": str(journal)}, default=str) + "\n")
        if res.answer is None:
            raise typer.Exit(1)
        return
    kernel = (f", {attention_kernel} attention" if attention_kernel != "flash" else "") + (
        f", {loss} loss" if loss != "online" else "") + (
        f", {grad_accumulation} gradient accumulation" if grad_accumulation != "fused" else "") + (
        f", recompute {recompute}" if recompute != AUTO_RECOMPUTE else "") + (
        f", recompute modules {modules}" if modules else "") + (f", {flags.label}" if flags.label else "")
    head = f"{model}, {format_tokens(context_tokens)} context, {lengths}, {strategy}{kernel}: {target.describe()}"
    done = (f"{len(res.table)} layouts decided: {', '.join(f'{n} {k}' for k, n in statuses.items())}; "
            f"{res.planned} planned, {res.reused} from the journal {journal}")
    if res.answer is None:
        fail(escape(f"{head}: no GPU count up to {max_gpus} meets the target ({done}"
                    + (f"; best {res.table['tokens_per_s'].max():,.0f} tokens/s"
                       if res.table["tokens_per_s"].notna().any() else "") + ")"), code=1)
    a = res.answer
    out.print(f"[bold]{escape(head)}[/]\n[bold green]{a['gpus']} GPUs[/] (the smallest count that meets it) with "
              f"tp={a['tp']} pp={a['pp']} (hdp={a['hdp']}, recompute={a['recompute']}): {a['tokens_per_s']:,.0f} "
              f"tokens/s, MFU {a['mfu']:.1%}, step {a['step_time_s']:.2f} s, peak {_gb(a['peak_memory_bytes'])} GB",
              highlight=False)
    if res.runners_up:
        t = Table(title="answer and runners-up (layouts planned)")
        for c in ("GPUs", "tp", "pp", "tokens/s", "MFU", "step (s)", "peak GB"):
            t.add_column(c, justify="right")
        for r in [a, *res.runners_up]:
            t.add_row(str(r["gpus"]), str(r["tp"]), str(r["pp"]), _rate(r["tokens_per_s"]), f"{r['mfu']:.1%}",
                      f"{r['step_time_s']:.2f}", _gb(r["peak_memory_bytes"]))
        out.print(t)
    skipped = res.not_planned()
    if len(skipped):
        out.print(f"{len(skipped)} other layout(s) at {a['gpus']} GPUs not planned (runners-up come only from "
                  "layouts planned); --best-layout plans those whose bound could beat this one.", highlight=False)
    smaller = res.table[res.table["gpus"] < a["gpus"]]
    if len(smaller):
        counts = smaller.groupby("gpus")["status"].agg(lambda s: ", ".join(f"{n} {k}" for k, n in
                                                                         s.value_counts().items()))
        out.print("smaller counts: " + "; ".join(f"{g} GPUs: {v}" for g, v in counts.items()), highlight=False)
    out.print(escape(done) + "; larger counts not searched.", highlight=False)


@contextmanager
def _capacity_progress(enabled: bool):
    """Progress of a capacity search on stderr: layouts decided at the current GPU count and overall (the
    overall total counts every allowed count; the search usually stops well before), with elapsed time."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not enabled) as prog:
        count = prog.add_task("GPU count", total=None)
        overall = prog.add_task("all counts", total=None)

        def on_progress(p) -> None:
            prog.update(count, completed=p.count_done, total=p.count_total,
                        description=escape(f"{p.gpus} GPUs ({p.count_index}/{p.counts}): {p.activity}"))
            prog.update(overall, completed=p.done, total=p.total, description="layouts, all counts")

        yield on_progress


@whatif_app.command("reproduce")
def whatif_reproduce(
        doc: Path = typer.Option(Path("docs/REPRODUCTION.md"), help="Document whose ByteScale section is rewritten."),
        table: Optional[Path] = typer.Option(None, help="Sweep table (+ journal) path (default: a temp folder)."),
        gpu_scale: float = typer.Option(1.0, help="Scale the paper's GPU counts (whole nodes)."),
        tokens_per_step: str = typer.Option("32M", help="Token budget per step."),
        steps: int = typer.Option(2, min=1, help="Sampled global batches per point."),
        workers: int = typer.Option(min(4, os.cpu_count() or 1), min=1, help="Processes planning in parallel."),
) -> None:
    """Regenerate docs/REPRODUCTION.md's ByteScale section: LLaMA-7B/13B/30B/70B and Mistral 8x7B/8x22B at
    256K-2M on github-like and byted-like, predicted speedups next to the paper's."""
    from planner.studies import BYTESCALE_TOKENS_PER_STEP, ByteScaleGrid, reproduce_bytescale

    tps = parse_tokens(tokens_per_step)
    grid = ByteScaleGrid(gpu_scale=gpu_scale, tokens_per_step=tps, steps=steps)
    cmd = "meshplan whatif reproduce" + (f" --gpu-scale {gpu_scale:g}" if gpu_scale != 1 else "") + (
        f" --tokens-per-step {tokens_per_step}" if tps != BYTESCALE_TOKENS_PER_STEP else "") + (
        f" --steps {steps}" if steps != 2 else "")
    try:
        with _progress_bar(grid.total_points(), "ByteScale grid") as on_point:
            rep = reproduce_bytescale(doc, grid, table=table, workers=workers, on_point=on_point, command=cmd)
    except KeyboardInterrupt:
        from planner.studies import default_bytescale_table

        _interrupted(table or default_bytescale_table())
    out.print(f"{rep.computed} points planned in {rep.elapsed_s:.0f} s; layouts "
              + ", ".join(f"{m} tp{tp}/pp{pp}" for m, (tp, pp) in rep.layouts.items())
              + f"; wrote the ByteScale section of {doc} and {', '.join(str(p) for p in rep.paths)}")


# -- validate: the cost model against published measurements -------------------------------------------
@app.command("validate")
def validate_cmd(
        sets: Optional[List[str]] = typer.Option(None, "--set", help="Calibration set, packaged or the path of "
                                                 "your own set's JSON file (repeatable; default: every packaged one: "
                                                 f"{', '.join(CALIBRATION_SETS)})."),
        profile: Optional[str] = typer.Option(None, help="Profile name or path for every set (default: each set's "
                                                         "cluster's, e.g. a100-sxm-80gb.analytic)."),
        attention_kernel: Optional[str] = typer.Option(None, "--attention-kernel", help="Price every run with this "
                                                       f"attention kernel, {one_of(ATTENTION_KERNELS)} (default: each "
                                                       "run's own, as its set records it)."),
        notes: bool = typer.Option(False, help="Print each case's modelling assumptions."),
        breakdown: bool = typer.Option(False, "--breakdown", help="Also print where each predicted time goes (% of "
                                       "the prediction): the busiest pipeline stage's GEMMs, attention, elementwise "
                                       "kernels, head (on the last stage only) and exposed communication, what the "
                                       "schedule adds (bubble, transfers), gradient sync, optimizer."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object: {sets: [{name, source, profile, "
                                                           "held_out, attention_kernel, mape, rows (each with its "
                                                           "parts and facets), memory}], held_out_by: {gpu, "
                                                           "sequence, layout, model: [{value, rows, mape, "
                                                           "mean_error}]}}."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the cases (PNG and SVG): predicted "
                                            "against published, each set's errors, and each run's memory against "
                                            "its GPU's."),
) -> None:
    """Reproduce published training measurements with the cost model: published, predicted and error per case,
    and the MAPE per set; and what each run needs per GPU (allocations and CUDA context) against the memory it
    trained in. Design sets informed the model: Korthikanti et al. 2022 (the A100's sustained GEMM rate is fitted to
    it) and the Megatron-Bridge Blackwell rows (Blackwell's GEMM rates; GB200's fitted to its rows); the others
    are held out."""
    from planner.studies import validate_cost_model

    names = sets or list(CALIBRATION_SETS)
    writable_figure(plot, "--plot")
    if attention_kernel is not None:
        check_choice("--attention-kernel", attention_kernel, ATTENTION_KERNELS)
    reps = [validate_cost_model(profile, name, attention_kernel) for name in names]
    held = [r for rep in reps if rep.held_out for r in rep.rows]
    by_facet = {f: facet_errors(held, f) for f in FACETS}
    figures = _plot_validation(reps, plot) if plot is not None else []
    if as_json:
        by = {f: [{"value": v, "rows": n, "mape": mape, "mean_error": bias} for v, n, mape, bias in groups]
              for f, groups in by_facet.items()}
        sys.stdout.write(json.dumps({"sets": [r.to_dict() for r in reps], "held_out_by": by}) + "\n")
        return
    for rep in reps:
        out.print(escape(rep.source), highlight=False, soft_wrap=True)
        role = "held out" if rep.held_out else "design set"
        kernel = f", {rep.attention_kernel} attention" if rep.attention_kernel else ""
        t = Table(title=escape(f"{rep.name} on {rep.profile}{kernel} ({role})"))
        for c in ("case", "published", "predicted", "error"):
            t.add_column(c, justify="left" if c == "case" else "right")
        for r in rep.rows:
            t.add_row(escape(r.case), f"{r.published:.2f} {r.unit}", f"{r.predicted:.2f} {r.unit}", f"{r.error:+.1%}")
        out.print(t)
        out.print(f"MAPE {rep.mape:.1%} over {len(rep.rows)} cases (error = predicted / published - 1)")
        if breakdown:
            out.print(_breakdown_table(rep))
        if rep.memory:
            out.print(_memory_table(rep))
        if notes:
            for r in rep.rows:
                out.print(escape(f"{r.case}: {r.note}"), highlight=False, soft_wrap=True)
    mem = [m for rep in reps for m in rep.memory]
    if mem:
        out.print(f"memory: {sum(m.fits for m in mem)} of {len(mem)} published runs fit their GPUs as the cost model "
                  f"counts their allocations and context (each ran); {sum(m.fits_with_reserve for m in mem)} with "
                  "the planner's fragmentation reserve too")
    if len(reps) > 1:
        rows = [r for rep in reps for r in rep.rows]
        if any(len(groups) > 1 for groups in by_facet.values()):
            out.print(_facet_table(by_facet))
        summary = f"all sets: MAPE {sum(abs(r.error) for r in rows) / len(rows):.1%} over {len(rows)} cases"
        if held:
            summary += f"; held out: {sum(abs(r.error) for r in held) / len(held):.1%} over {len(held)} cases"
        out.print(summary)
    wrote_figure(figures)


def _plot_validation(reps, path: Path) -> list[Path]:
    """validate --plot: every case in seconds (a layer's ms too), one group a set, and the runs' memory."""
    from planner.report import Comparison, plot_accuracy

    scale = {"ms": 1e-3, "s": 1.0}
    groups = [Comparison(rep.name, tuple(r.published * scale[r.unit] for r in rep.rows),
                         tuple(r.predicted * scale[r.unit] for r in rep.rows), rep.held_out)
              for rep in reps if rep.rows]
    memory = [(rep.name, [m.needed_bytes / m.hbm_bytes for m in rep.memory]) for rep in reps if rep.memory]
    rows = [r for rep in reps for r in rep.rows]
    title = (f"meshplan validate: {len(rows)} published cases of {len(groups)} set(s), MAPE "
             f"{sum(abs(r.error) for r in rows) / max(1, len(rows)):.1%}")
    return plot_accuracy(groups, path, title=title, measured_label="published", memory=memory)


def _facet_table(by_facet: dict[str, list[tuple[str, int, float, float]]]) -> Table:
    """The held-out rows' error by GPU, sequence length, layout and model kind (facet_errors per facet): MAPE and
    the mean signed error (the bias)."""
    t = Table(title="held-out rows by kind of run (mean error > 0: the model is slower than measured)")
    for c in ("by", "kind", "rows", "MAPE", "mean error"):
        t.add_column(c, justify="left" if c in ("by", "kind") else "right")
    for f, title in FACETS.items():
        for i, (v, n, mape, bias) in enumerate(by_facet[f]):
            t.add_row(title if i == 0 else "", escape(v), str(n), f"{mape:.1%}", f"{bias:+.1%}")
    return t


def _breakdown_table(rep) -> Table:
    """Each row's prediction by part, as shares of it (only the parts some row of the set has)."""
    from planner.studies.validation import BREAKDOWN_PARTS

    shown = [k for k in BREAKDOWN_PARTS if any(abs(r.parts.get(k, 0.0)) > 5e-4 * r.predicted for r in rep.rows)]
    t = Table(title=escape(f"{rep.name}: where the predicted time goes, % of it (the busiest stage's work)"))
    for c in ("case", "error", *(BREAKDOWN_PARTS[k] for k in shown)):
        t.add_column(c, justify="left" if c == "case" else "right")
    for r in rep.rows:
        shares = (100 * r.parts.get(k, 0.0) / r.predicted for k in shown)
        t.add_row(escape(r.case), f"{r.error:+.1%}", *(f"{x:.1f}" if abs(x) >= 0.05 else "0.0" for x in shares))
    return t


def _memory_table(rep) -> Table:
    """Memory per GPU of each published run (its busiest stage) against the GPU's: its largest parts, what it
    allocates, with the CUDA context, the headroom that left for fragmentation, and whether the planner's
    fragmentation reserve would fit too."""
    t = Table(title=escape(f"{rep.name}: memory per GPU, GB (every run trained in it)"))
    for c in ("case", "stage", "held layers", "states", "activations", "allocated", "+ context", "GPU", "headroom",
              "fits", "+ reserve"):
        t.add_column(c, justify="left" if c == "case" else "right")
    for m in rep.memory:
        t.add_row(escape(m.case), str(m.stage), str(m.held_layers), f"{m.parts['states'] / 1e9:.1f}",
                  f"{m.parts['activations'] / 1e9:.1f}", f"{m.allocated_bytes / 1e9:.1f}",
                  f"{m.needed_bytes / 1e9:.1f}", f"{m.hbm_bytes / 1e9:.1f}",
                  f"{m.headroom_bytes / 1e9:.1f} ({m.headroom_bytes / m.hbm_bytes:.0%})",
                  "yes" if m.fits else "[red]no[/red]",
                  f"{m.parts['fragmentation'] / 1e9:.1f}: " + ("yes" if m.fits_with_reserve else "no"))
    return t


# -- calibrate: fit a profile to measured replay traces --------------------------------------------------
@app.command("calibrate")
def calibrate_cmd(
        pairs: List[str] = typer.Argument(..., metavar="PLAN:TRACE",
                                          help="A plan.json and a `meshplan replay --trace` file of it, joined by "
                                               "':'; repeat (a plan may have several traces; 2 plans at least)."),
        profile: str = typer.Option(..., help="Base profile (name or path) whose physical parameters are fitted."),
        out_path: Path = typer.Option(..., "--out", help="Profile JSON to write (the fitted profile)."),
        holdout: Optional[List[Path]] = typer.Option(None, help="A plan to leave out of the fit and judge it on "
                                                                "(repeatable; default: leave each plan out in turn)."),
        prior_width: Optional[float] = typer.Option(
            None, "--prior-width", help="How far the tables may move from the base before the traces are seen: the "
                                        "standard deviation of log(multiplier) (default 0.5 for a measured base, "
                                        "1 for an analytic one; inf: no prior)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object: {base, profile, params, "
                                                           "holdout, held_out, fitted, held_out_all, ...}."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw each plan's errors per step and per unit, "
                                            "the base profile's and the fitted one's (PNG and SVG)."),
) -> None:
    """Fit a profile's physical parameters (GEMM, attention, memory and collective table times; per-layer and
    per-attention-call overheads) to measured replay traces and write the fitted profile; report the error
    before and after on plans the fit did not see. Each plan weighs the same in the fit, a unit far off its
    price (beyond about 10%) pulls with a bounded force (robust least squares), and each table's multiplier
    starts from a prior around the base (--prior-width). Where the traces record each unit's own-thread CPU (CPU
    replays), the compute parameters are fitted to it and the collectives to the wall times."""
    from planner.studies import calibrate

    writable(out_path, "--out")
    writable_figure(plot, "--plot")
    parsed = []
    for p in pairs:
        plan, sep, trace = p.partition(":")
        if not (sep and plan and trace):
            fail(f"{p}: expected PLAN:TRACE (a plan.json and the `meshplan replay --trace` file of it)")
        parsed.append((Path(plan), Path(trace)))
    if prior_width is not None and not prior_width > 0:
        fail(f"--prior-width {prior_width:g}: must be above 0 (inf fits without a prior)")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=as_json) as prog:
        task = prog.add_task("reading traces", total=None)  # a fit: the written one, and one per plan left out
        res = calibrate(parsed, profile, holdout or (), prior_width=prior_width,
                        progress=lambda what, done, fits: prog.update(task, description=escape(what), completed=done,
                                                                      total=fits))
    # the figure before the profile: one that cannot be written leaves nothing behind
    figures = _plot_calibration(res, plot) if plot is not None else []
    res.profile.save(out_path)
    if as_json:
        sys.stdout.write(json.dumps({**res.to_dict(), "out": str(out_path)}) + "\n")
        return
    prior = f"prior width {res.prior_width:g}" if math.isfinite(res.prior_width) else "no prior"
    t = Table(title=escape(f"physical parameters: {res.base} -> {res.profile.fingerprint.name} "
                           f"({res.rows} measured times, RMS error after {res.rms_rel_err:.1%}, {prior}; "
                           f"fitted to {res.basis})"))
    for c in ("parameter", "meaning", "base", "fitted", "± 1 s.e.", "status"):
        t.add_column(c, justify="left" if c in ("parameter", "meaning", "status") else "right")
    for p in res.params:
        t.add_row(p.name, escape(p.meaning), f"{p.base:.4g}", f"{p.fitted:.4g}",
                  "" if p.std_err is None else f"{p.std_err:.2g}", p.status)
    out.print(t)
    for p in res.params:
        if p.note:
            out.print(escape(f"{p.name} {p.status}: {p.note}"), highlight=False, soft_wrap=True)
    t = Table(title=f"|predicted / measured - 1|, before -> after ({res.holdout})")
    rows = res.held_out + (res.held_out_all,) + res.fitted + (res.fitted_all,)
    cpu = any(math.isfinite(e.unit_cpu_median_before) for e in rows)  # CPU traces: the units' own-thread CPU too
    for c in ("plan", "role", "traces", "units", "unit median", "unit max", "step median", "step max") + \
            (("unit CPU median",) if cpu else ()):
        t.add_column(c, justify="left" if c in ("plan", "role") else "right")
    arrow = lambda a, b: f"{a:.1%} -> {b:.1%}" if math.isfinite(a) else "-"  # noqa: E731
    for e in rows:
        t.add_row(escape(e.plan), e.role, str(e.traces), str(e.units), arrow(e.unit_median_before, e.unit_median_after),
                  arrow(e.unit_max_before, e.unit_max_after), arrow(e.step_median_before, e.step_median_after),
                  arrow(e.step_max_before, e.step_max_after),
                  *((arrow(e.unit_cpu_median_before, e.unit_cpu_median_after),) if cpu else ()))
    out.print(t)
    out.print(escape(f"* wrote {out_path}: {res.profile.fingerprint.name} (sha256 {res.profile.fingerprint.sha256})"),
              highlight=False)
    wrote_figure(figures)


def _plot_calibration(res, path: Path) -> list[Path]:
    """calibrate --plot: per plan, held out then fitted on, its errors per step and per unit before and after."""
    from planner.report import Strip, plot_strips

    plans = res.held_out + res.fitted
    order = list(dict.fromkeys(e.plan for e in plans))  # a plan's colour, held out and fitted on alike
    stems = [Path(p).stem for p in order]
    name = {p: (st if stems.count(st) == 1 else p) for p, st in zip(order, stems)}  # the path where names clash
    panels = [(f"per {what}", [Strip(f"{name[e.plan]} ({e.role})", getattr(e, f"{what}_errors_after"),
                                     e.role == "held-out", getattr(e, f"{what}_errors_before"), order.index(e.plan))
                               for e in plans]) for what in ("step", "unit")]
    fit = "each plan held out in turn" if res.holdout == "leave-one-plan-out" else "named plans held out"
    return plot_strips(panels, path, title=f"meshplan calibrate: {res.base} -> {res.profile.fingerprint.name} ({fit})")


@app.command("report")
def report_cmd(
        source: Path = typer.Argument(..., help="A plan.json (Gantt and memory figures) or a sweep table "
                                                "(.csv / .parquet: a full report)."),
        gantt: Optional[Path] = typer.Option(None, help="Plan: per-rank timeline figure (PNG and SVG)."),
        memory: Optional[Path] = typer.Option(None, help="Plan: memory breakdown per rank (per stage with PP)."),
        step: int = typer.Option(0, min=0, help="Plan: which step."),
        profile: Optional[str] = typer.Option(None, help="Plan: re-simulate on another profile."),
        max_ranks: int = typer.Option(256, min=1, help="Plan: HDP ranks drawn in the Gantt."),
        out_dir: Optional[Path] = typer.Option(None, "--out", help="Sweep: report folder (default: STEM_report)."),
        example: bool = typer.Option(True, help="Sweep: re-plan the best-speedup point for a Gantt and memory."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object: {source, kind, written: [paths]}."),
) -> None:
    """Figures of a plan (Gantt, memory) or a self-contained report of a sweep table."""
    from planner.report import plot_plan, write_sweep_report

    def wrote(kind: str, paths: list[Path]) -> None:
        if as_json:
            sys.stdout.write(json.dumps({"source": str(source), "kind": kind, "written": [str(p) for p in paths]})
                             + "\n")
        else:
            out.print(escape("wrote " + ", ".join(str(p) for p in paths)), highlight=False, soft_wrap=True)

    if source.suffix in (".csv", ".parquet"):
        df = _read_table(source)  # a one-line error naming the file when it is not a sweep table
        folder = out_dir or source.with_name(source.stem + "_report")
        figures = folder / "figures"
        before = {f: f.stat().st_mtime_ns for f in figures.iterdir()} if figures.is_dir() else {}
        md = write_sweep_report(df, folder, example=example)
        new = sorted(f for f in figures.iterdir() if before.get(f) != f.stat().st_mtime_ns) if figures.is_dir() else []
        wrote("sweep", [md, md.with_suffix(".html"), *new])
        return
    if gantt is None and memory is None:
        fail("give --gantt FILE and/or --memory FILE for a plan (or pass a sweep .csv/.parquet)")
    from planner.plan import validate

    plan = load_plan(source)
    validate(plan)
    if not 0 <= step < len(plan.steps):
        fail(f"--step {step}: the plan has {len(plan.steps)} step(s)")
    cm = cost_model_for_plan(plan, profile)
    figs = plot_plan(plan, cm, step=step, gantt=gantt, memory=memory, max_ranks=max_ranks)
    wrote("plan", [*figs.gantt, *figs.memory])


def _draw_machine_check(res) -> list[Path]:
    """machine-check's accuracy.png / .svg: units and steps of each plan on each profile, one group each."""
    from planner.report import Comparison, plot_accuracy

    groups = [g for a in res.accuracy for what, rows in (("units", a.units), ("steps", a.steps))
              if (g := Comparison.from_rows(f"{a.case} {what} ({a.role})", rows)).measured_s]
    return plot_accuracy(groups, res.out_dir / "accuracy.png", title=f"meshplan machine-check ({res.device}): "
                         "predicted vs measured, warm iterations")


# -- machine-check: one command that validates a machine end to end (planner/studies/machine_check) -----------
@app.command("machine-check")
def machine_check_cmd(
        out_dir: Path = typer.Option(..., "--out", help="Folder for everything: profile, plans, traces, logs, "
                                                        "summary.md, machine_check.json."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
        budget_s: Optional[float] = typer.Option(None, "--budget-s", help="Wall-time budget in seconds, split into "
                                                 "per-phase budgets (default: 480 on GPU, 180 on CPU)."),
        steps: int = typer.Option(6, "--steps", min=2, help="Replay iterations per plan (each plan step's first "
                                                            "replay is left out as warm-up)."),
        seed: int = typer.Option(0, "--seed", help="Lengths, model init and tokens."),
        cases: Optional[List[str]] = typer.Option(None, "--case", help="Replay only this plan (repeatable), e.g. "
                                                  "cpu1, cpu2-gloo, gpu1-packed, gpu1-long; default: all of the "
                                                  "device's."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object: {ok, environment, checks, "
                                                           "accuracy, ...}."),
) -> None:
    """Validate this machine end to end within a time budget: environment (driver, torch, CUDA, NCCL,
    flash-attn), a quick profile, small plans replayed with --check (bf16 on GPU, fp32 on CPU), and predicted
    vs measured per unit and per step (MAPE) on the device's reference profile and the fresh one. Writes
    everything under --out; exit code 1 when a check failed or was skipped for lack of time."""
    from planner.studies.machine_check import MachineCheckRequest, environment_line, host_ratio, machine_check

    if device is not None:
        check_choice("--device", device, ("cpu", "cuda"))
    req = MachineCheckRequest(out_dir=out_dir, device=device, budget_s=budget_s, steps=steps, seed=seed,
                              cases=tuple(cases) if cases else None)
    res = machine_check(req, progress=None if as_json else lambda m: err.print(escape(m), highlight=False),
                        draw=_draw_machine_check)
    if as_json:
        sys.stdout.write(json.dumps(res.to_dict(), default=str) + "\n")
        raise typer.Exit(0 if res.ok else 1)
    out.print(escape(environment_line(res.environment)), highlight=False, soft_wrap=True)
    t = Table(title=f"checks ({res.elapsed_s:.0f} s of a {res.budget_s:.0f} s budget)")
    for c in ("phase", "check", "status", "seconds", "detail"):
        t.add_column(c, justify="right" if c == "seconds" else "left")
    for c in res.checks:
        style = {"failed": "red", "skipped": "yellow"}.get(c.status)
        t.add_row(c.phase, escape(c.name), f"[{style}]{c.status}[/]" if style else c.status, f"{c.seconds:.1f}",
                  escape(c.detail))
    out.print(t)
    if res.accuracy:
        t = Table(title="predicted vs measured (error = predicted / measured - 1; MAPE = mean |error|)")
        for c in ("plan", "profile", "units", "unit MAPE", "step MAPE", "steps predicted / measured (ms)",
                  "host probe x"):
            t.add_column(c, justify="left" if c in ("plan", "profile") else "right")
        for a in res.accuracy:
            t.add_row(escape(a.case), escape(f"{a.profile} ({a.role})"), str(len(a.units)), f"{a.unit_mape:.1%}",
                      f"{a.step_mape:.1%}", ", ".join(f"{s['predicted_s'] * 1e3:.1f} / {s['measured_s'] * 1e3:.1f}"
                                                      for s in a.steps), host_ratio(a.host_slowdown))
        out.print(t)
    wrote = [out_dir / "summary.md", out_dir / "machine_check.json", *res.figures]
    out.print(escape(f"{'PASSED' if res.ok else 'FAILED'}; wrote {', '.join(map(str, wrote[:-1]))} and {wrote[-1]}"),
              highlight=False)
    if not res.ok:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()

"""meshplan command line: thin typer app. Parses, calls library functions, prints with rich.
Library errors (SpecError, ProfileError, PlanError, SourceError, ...) become one line on stderr
and exit code 2; nothing here holds planning logic."""

from __future__ import annotations

import json
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from costmodel.presets import cluster_names, load_cluster, load_model, model_names
from costmodel.specs import SpecError
from profiles.table import ProfileError, load_profile, profile_names

# Every library error type a user can cause; each command section adds its package's type.
USER_ERRORS: tuple[type[Exception], ...] = (SpecError, ProfileError, OSError)



class _App(typer.Typer):
    """Typer app that reports library errors as one line and exit code 2, never a traceback."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except USER_ERRORS as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            sys.exit(2)


app = _App(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
           help="Plan dynamic DP x CP (HDP) meshes and pipeline slicing for long-context training.")
presets_app = typer.Typer(add_completion=False, invoke_without_command=True,
                          help="List model, cluster and profile presets; `show NAME` prints one.")
app.add_typer(presets_app, name="presets")

out = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


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


@presets_app.callback()
def presets_list(ctx: typer.Context) -> None:
    """List every model, cluster and profile preset."""
    if ctx.invoked_subcommand is not None:
        return
    t = Table(title="models", show_lines=False)
    for c in ("name", "layers", "hidden", "heads/kv", "ffn", "vocab", "experts", "params (B)", "active (B)"):
        t.add_column(c, justify="right" if c not in ("name",) else "left")
    for n in model_names():
        m = load_model(n)
        t.add_row(n, str(m.layers), str(m.hidden), f"{m.heads}/{m.kv_heads}", str(m.ffn), str(m.vocab),
                  f"{m.experts}x top{m.top_k}" if m.is_moe else "-", f"{m.parameters / 1e9:.2f}",
                  f"{m.active_parameters / 1e9:.2f}")
    out.print(t)
    t = Table(title="clusters")
    for c in ("name", "gpu", "nodes x gpus", "HBM (GB)", "intra GB/s", "inter GB/s", "profile"):
        t.add_column(c)
    for n in cluster_names():
        c = load_cluster(n)
        t.add_row(n, c.gpu, f"{c.nodes} x {c.gpus_per_node}", f"{c.gpu_memory_bytes / 1e9:.0f}",
                  f"{c.intra_node_bw_bytes_per_s / 1e9:.0f}", f"{c.inter_node_bw_bytes_per_s / 1e9:.0f}", c.profile)
    out.print(t)
    t = Table(title="profiles")
    for c in ("name", "source", "device", "created", "sha256"):
        t.add_column(c)
    for n in profile_names():
        fp = load_profile(n).fingerprint
        t.add_row(n, fp.source, fp.device, fp.created, fp.sha256[:12])
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
        t = Table(title=name, show_header=False)
        for k, v in d.items():
            t.add_row(k, json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))
        out.print(t)


# -- lengths: length sources and their distributions ---------------------------------------------
from pathlib import Path  # noqa: E402  (each command section keeps its imports with it)

from planner.sources import (DEFAULT_SAMPLES, SourceError, describe_lengths, format_tokens,  # noqa: E402
                             open_source, parse_tokens, plot_description, split_at_context)

USER_ERRORS += (SourceError,)

lengths_app = typer.Typer(add_completion=False, no_args_is_help=True,
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
import os  # noqa: E402
import subprocess  # noqa: E402
from importlib.util import find_spec  # noqa: E402
from pathlib import Path  # noqa: E402

from rich.markup import escape  # noqa: E402

from planner.plan import PlanError  # noqa: E402

USER_ERRORS += (PlanError,)

# torchrun options that make a multi-node job: with any of them there is no --standalone.
_RENDEZVOUS_FLAGS = ("--nnodes", "--node-rank", "--node_rank", "--rdzv-endpoint", "--rdzv_endpoint", "--rdzv-backend",
                     "--rdzv_backend", "--rdzv-id", "--rdzv_id", "--rdzv-conf", "--rdzv_conf", "--master-addr",
                     "--master_addr", "--master-port", "--master_port")


def _torchrun_nnodes(args: list[str]) -> str | None:
    for i, a in enumerate(args):
        if a.startswith("--nnodes="):
            return a.split("=", 1)[1]
        if a == "--nnodes" and i + 1 < len(args):
            return args[i + 1]
    return None


def _run_torchrun(cmd: list[str], env: dict[str, str]) -> tuple[int, str | None]:
    """Run torchrun, stdout straight through, stderr forwarded line by line. Returns the exit code
    and the first rank error that is a root cause (not a rank stopped by a peer's failure); after
    it, only the ranks' own error lines are forwarded, not the launcher's traceback."""
    root = None
    seen_rank_error = False
    with subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, bufsize=1) as proc:
        for line in proc.stderr:
            is_error = line.startswith("error: ")
            if is_error and root is None and "stopped (a peer rank failed first)" not in line:
                root = line[len("error: "):].strip()
            seen_rank_error = seen_rank_error or is_error
            if is_error or not seen_rank_error:
                sys.stderr.write(line)
                sys.stderr.flush()
    return proc.returncode, root


@app.command("replay", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def replay(ctx: typer.Context,
           plan: Path = typer.Argument(..., help="Plan JSON (pp = 1 and tp = 1 for now)."),
           nproc: int = typer.Option(..., "--nproc", help="Processes per node: one per GPU, or CPU workers (gloo)."),
           model: Optional[str] = typer.Option(None, "--model", help="Model preset or file to build instead of "
                                               "the plan's meta.model, e.g. tiny."),
           steps: Optional[int] = typer.Option(None, "--steps", help="Iterations (default: every plan step once; "
                                               "more cycle the plan with fresh tokens)."),
           check: bool = typer.Option(False, "--check", help="Rank 0 also runs a single-process reference step; "
                                      'prints {"check": {"max_rel_grad_err", "loss_abs_err", "ranks", "units"}}.'),
           trace: Optional[Path] = typer.Option(None, "--trace", help="Measured trace JSON (PATH.chrome.json is "
                                                "written beside it), only once the run finished."),
           cp: str = typer.Option("ring", "--cp", help="Context-parallel attention: ring (overlapped) or allgather."),
           seed: int = typer.Option(0, "--seed", help="Model init and generated tokens."),
           optimizer: str = typer.Option("adamw", "--optimizer", help="adamw or sgd."),
           lr: float = typer.Option(1e-3, "--lr", help="Learning rate."),
           tokens: Optional[Path] = typer.Option(None, "--tokens", help="Flat .npy token stream (default: tokens "
                                                 "generated per sequence id)."),
           device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu or cuda."),
           timeout_s: float = typer.Option(300.0, "--timeout-s", help="Process-group timeout in seconds."),
           inject_failure: Optional[str] = typer.Option(None, "--inject-failure", hidden=True,
                                                        help="Testing: RANK:UNIT fails in that unit's forward.")) -> None:
    """Replay a plan for real under torchrun: units in the plan's order, context parallelism over
    P2P, one gradient all-reduce per step. Arguments it does not know go to torchrun, e.g.
    `--nnodes 2 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id JOB` for a
    multi-node job; without them the job is standalone on this machine."""
    if find_spec("torch") is None:
        fail("torch is not installed; install the runtime extra: pip install 'meshplan[runtime]'")
    extra = list(ctx.args)
    multi_node = any(a.split("=", 1)[0] in _RENDEZVOUS_FLAGS for a in extra)
    nnodes = _torchrun_nnodes(extra)
    world = nproc * int(nnodes) if nnodes and nnodes.isdigit() else (None if multi_node else nproc)
    from planner.runtime import preflight  # torch-free: refuse a bad plan before any process starts

    preflight(plan, world, model)
    args = [str(plan), "--cp", cp, "--seed", str(seed), "--optimizer", optimizer, "--lr", repr(lr),
            "--device", device, "--timeout-s", repr(timeout_s)]
    args += ["--model", model] if model else []
    args += ["--steps", str(steps)] if steps is not None else []
    args += ["--check"] if check else []
    args += ["--trace", str(trace)] if trace is not None else []
    args += ["--tokens", str(tokens)] if tokens is not None else []
    args += ["--inject-failure", inject_failure] if inject_failure else []
    cmd = [sys.executable, "-m", "torch.distributed.run", *([] if multi_node else ["--standalone"]), *extra,
           "--nproc-per-node", str(nproc), "-m", "planner.runtime", *args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # no oversubscription
    rc, root = _run_torchrun(cmd, env)
    if rc:
        fail(escape(f"replay failed: {root}" if root else f"replay failed (torchrun exit code {rc}); see above"),
             code=1 if root and root.startswith("rank") else 2)


# -- plan / simulate: the planner ------------------------------------------------------------------
from planner.api import PlanRequest, compare as compare_strategies, cost_model_for_plan  # noqa: E402
from planner.plan import Plan as _Plan, PlanError as _PlanError  # noqa: E402
from planner.strategies import STRATEGIES, PlanOptions  # noqa: E402

USER_ERRORS += (_PlanError,)


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


@app.command("plan")
def plan_cmd(
        model: str = typer.Option("llama-7b", help="Model preset or config.json path."),
        cluster: str = typer.Option("dgx-h100", help="Cluster preset or JSON path."),
        gpus: int = typer.Option(64, help="GPUs (whole nodes, or part of one)."),
        tp: int = typer.Option(1, help="Tensor-parallel degree."),
        pp: int = typer.Option(1, help="Pipeline stages."),
        profile: Optional[str] = typer.Option(None, help="Profile name or path (default: the cluster's)."),
        lengths: str = typer.Option("byted-like", help="Length source: file or name (see `meshplan lengths`)."),
        steps: int = typer.Option(1, min=1, help="Global batches (steps) to plan."),
        tokens_per_step: str = typer.Option("32M", help="Token budget per step (K/M suffixes)."),
        max_context: str = typer.Option("2M", help="Longest sequence; longer documents are split."),
        recompute: str = typer.Option("auto", help="none | selective | full | auto (least that fits the context)."),
        capacity: Optional[str] = typer.Option(None, help="Override the per-rank token capacity C."),
        offload: bool = typer.Option(True, help="Selective activation offloading (hdp strategies)."),
        strategy: str = typer.Option("hdp", help=f"Strategy whose plan is written: {', '.join(STRATEGIES)}."),
        compare: str = typer.Option(",".join(STRATEGIES), help="Strategies in the comparison table."),
        out_path: Path = typer.Option(Path("plan.json"), "--out", help="Where the plan is written."),
        trace: Optional[Path] = typer.Option(None, help="Also write a Chrome/Perfetto trace of the plan."),
        seed: int = typer.Option(0, help="Seed of the length source."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Plan training steps, compare strategies, and write the chosen strategy's plan.json."""
    names = [x.strip() for x in compare.split(",") if x.strip()]
    for n in names + [strategy]:
        if n not in STRATEGIES:
            fail(f"unknown strategy {n!r}; one of {', '.join(STRATEGIES)}")
    if strategy not in names:
        names.append(strategy)
    if recompute not in ("auto", "none", "selective", "full"):
        fail(f"--recompute must be auto, none, selective or full, got {recompute!r}")
    req = PlanRequest(model=model, cluster=cluster, gpus=gpus, tp=tp, pp=pp, profile=profile, lengths=lengths,
                      steps=steps, tokens_per_step=parse_tokens(tokens_per_step),
                      max_context_tokens=parse_tokens(max_context), recompute=recompute,
                      capacity_tokens=parse_tokens(capacity) if capacity else None, seed=seed,
                      options=PlanOptions(offload=offload, seed=seed))
    from rich.progress import Progress

    with Progress(console=err, transient=True, disable=as_json) as prog:
        task = prog.add_task("planning", total=len(names))
        res = compare_strategies(req, names, progress=lambda n: prog.update(task, advance=1, description=n))
    if strategy not in res.plans:
        fail(f"strategy {strategy} could not plan this case: {res.failures[strategy]}")
    plan = res.plans[strategy]
    plan.save(out_path)
    if trace:
        from planner.simulate import simulate_step

        simulate_step(plan.steps[0], res.cost_model).write_trace(trace)
    if as_json:
        sys.stdout.write(json.dumps({"plan": str(out_path), "summary": [x.to_dict() for x in res.summaries],
                                     "failures": res.failures}) + "\n")
        return
    cm = res.cost_model
    su = cm.setup
    out.print(f"[bold]{su.model.name}[/] on {su.cluster.world_size} x {su.cluster.gpu} ({su.cluster.name}), "
              f"tp={su.training.tp} pp={su.training.pp} hdp={su.hdp}, recompute={su.training.recompute}, "
              f"C={cm.capacity_tokens} tokens/rank, profile {cm.profile.fingerprint.name}")
    b = res.batches
    out.print(f"{len(b)} step(s) of {lengths}: {sum(len(x.lengths_tokens) for x in b)} sequences, "
              f"{sum(x.total_tokens for x in b)} tokens, longest {max(int(x.lengths_tokens.max()) for x in b)}"
              + (f", {sum(x.split_documents for x in b)} document(s) split at the max context"
                 if any(x.split_documents for x in b) else ""))
    t = Table(title="predicted per step (mean over steps)")
    for c in ("strategy", "step time (s)", "/ lower bound", "tokens/s", "MFU", "speedup vs static",
              "busiest rank (s)", "idlest rank (s)", "peak mem (GB)", "plan time (s)"):
        t.add_column(c, justify="left" if c == "strategy" else "right")
    for x in res.summaries:
        t.add_row(x.strategy + (" *" if x.strategy == strategy else ""), f"{x.step_time_s:.2f}",
                  f"{x.step_time_s / x.lower_bound_s:.2f}", f"{x.tokens_per_s:,.0f}", f"{x.mfu:.1%}",
                  "-" if x.speedup_vs_static is None else f"{x.speedup_vs_static:.2f}x",
                  f"{x.busiest_rank_s:.2f}", f"{x.idlest_rank_s:.2f}", _gb(x.peak_memory_bytes), f"{x.planning_s:.2f}")
    for n, why in res.failures.items():
        t.add_row(n, "infeasible", "", "", "", "", "", "", "", "", style="dim")
        err.print(f"[yellow]{n}:[/] {why}", soft_wrap=True)
    out.print(t)
    out.print(f"MFU: causal attention halved, recompute excluded, peak {cm.peak_flops() / 1e12:.0f} TFLOP/s. "
              f"Wrote {out_path} ({strategy})" + (f" and trace {trace}" if trace else ""))


@app.command("simulate")
def simulate_cmd(
        plan_path: Path = typer.Argument(..., help="A plan.json written by `meshplan plan`."),
        profile: Optional[str] = typer.Option(None, help="Re-simulate on another profile."),
        trace: Optional[Path] = typer.Option(None, help="Write a Chrome/Perfetto trace of step 0."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Re-simulate a plan: step time, breakdown, busiest and idlest ranks, peak memory."""
    from planner.plan import validate
    from planner.simulate import simulate_plan

    plan = _Plan.load(plan_path)
    validate(plan)
    cm = cost_model_for_plan(plan, profile)
    sims = simulate_plan(plan, cm)
    if trace:
        sims[0].write_trace(trace)
    rows = [{"step": x.step, "step_time_s": x.step_time_s, "lower_bound_s": x.lower_bound_s,
             "busiest_rank_s": max(x.per_rank_busy_s), "idlest_rank_s": min(x.per_rank_busy_s),
             "peak_memory_bytes": max(x.peak_memory_bytes), "breakdown": x.breakdown} for x in sims]
    if as_json:
        sys.stdout.write(json.dumps({"plan": str(plan_path), "profile": cm.profile.fingerprint.name,
                                     "steps": rows}) + "\n")
        return
    t = Table(title=f"{plan_path} ({plan.meta.get('strategy')}) on {cm.profile.fingerprint.name}")
    keys = list(rows[0]["breakdown"]) if rows else []
    for c in ["step", "step time (s)", "/ LB", "busiest (s)", "idlest (s)", "peak mem (GB)"] + keys:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(str(r["step"]), f"{r['step_time_s']:.3f}", f"{r['step_time_s'] / r['lower_bound_s']:.2f}",
                  f"{r['busiest_rank_s']:.3f}", f"{r['idlest_rank_s']:.3f}", _gb(r["peak_memory_bytes"]),
                  *[f"{r['breakdown'][k]:.3f}" for k in keys])
    out.print(t)
    out.print("breakdown columns: seconds per rank (mean over ranks)" + (f"; trace written to {trace}" if trace else ""))



if __name__ == "__main__":
    app()

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


if __name__ == "__main__":
    app()

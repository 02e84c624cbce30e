"""`torchrun --nproc-per-node N -m planner.runtime plan.json [options]`: replay a plan.

Prints JSON lines on rank 0 once the run finished: one {"step": ...} per step and, with --check,
{"check": {"max_rel_grad_err", "loss_abs_err", "ranks", "units"}}. Exit codes: 0 done, 2 plan
refused (before anything ran), 1 a rank failed (its rank and unit are on stderr)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from costmodel.specs import RECOMPUTE_POLICIES
from planner.runtime.launch import BLOCK_KERNELS, CP_IMPLS, OPTIMIZERS, PRECISIONS, InjectedFailure, ReplayOptions


def _injected(text: str) -> InjectedFailure:
    try:
        return InjectedFailure.parse(text)
    except ValueError as e:  # PlanError
        raise argparse.ArgumentTypeError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m planner.runtime", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan_path", metavar="plan", type=Path,
                   help="plan JSON, or a plan stream (*.jsonl: each rank reads only the steps it runs)")
    p.add_argument("--model", default=None, help="model preset or file (default: the plan's meta.model), e.g. tiny")
    p.add_argument("--steps", type=int, default=None, help="iterations (default: every plan step once; more cycle)")
    p.add_argument("--check", action="store_true", help="compare with a single-process reference on rank 0")
    p.add_argument("--trace", dest="trace_path", type=Path, default=None,
                   help="measured trace JSON; PATH.chrome.json is written too")
    p.add_argument("--cp", dest="cp_impl", choices=CP_IMPLS, default="ring", help="context-parallel attention")
    p.add_argument("--ring-kernel", choices=BLOCK_KERNELS, default="auto",
                   help="ring block kernel: auto (fused on CPU, math elsewhere), math, fused-cpu or flash-cuda "
                   "(CUDA, opt-in)")
    p.add_argument("--seed", type=int, default=0, help="model init and generated tokens")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tokens", dest="tokens_path", type=Path, default=None,
                   help="token ids: a flat .npy array or a Megatron .bin/.idx pair (either path); labels stay inside "
                        "each document (default: tokens generated per sequence id)")
    p.add_argument("--dtype", choices=PRECISIONS, default="fp32",
                   help="bf16: autocast forward with fp32 master weights and gradients; --check then compares "
                        "with a bf16 reference")
    p.add_argument("--recompute", choices=RECOMPUTE_POLICIES, default=None,
                   help="activation recompute: none, selective (attention core), full (each layer); default: the "
                        "plan's meta.training.recompute")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--timeout-s", type=float, default=300.0, help="process-group timeout")
    p.add_argument("--inject-failure", type=_injected, default=None, metavar="RANK:UNIT[:kill]",
                   help="testing: make RANK fail in the forward of UNIT (kill: by SIGKILL, without a word)")
    p.add_argument("--hf-config", type=Path, default=None,
                   help="a HuggingFace config.json (Llama, Qwen2, Mistral) to build instead of --model "
                        "(needs transformers)")
    p.add_argument("--hf-weights", type=Path, default=None,
                   help="its safetensors checkpoint (file or directory); each rank loads only its stage's tensors")
    p.add_argument("--plan-ahead", action="store_true",
                   help="rank 0 plans step t+1 with the plan's request (meta) while step t runs and sends each rank "
                        "only its part; --steps iterations (default: the plan's step count)")
    p.add_argument("--lengths", default=None,
                   help="--plan-ahead: the length source to plan from (default: the plan's meta.options.lengths)")
    p.add_argument("--status-dir", type=Path, default=None,
                   help="each rank keeps the step and unit it is in here (rankN), so that the launcher can name "
                        "them when a rank dies without a word")
    return p


def main(argv: list[str] | None = None) -> int:
    from planner.runtime.job import run  # torch: after the arguments parsed

    return run(ReplayOptions(**vars(parser().parse_args(argv))))


if __name__ == "__main__":
    sys.exit(main())

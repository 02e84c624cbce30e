"""The torch executor: replays a plan under torchrun (`python -m planner.runtime plan.json`).

The only package besides profiles/measure that imports torch; it reads plans (planner/plan) and
never imports strategies. Where each part lives:

- ``launch.py``   options, the checks before any rank works (preflight), the torchrun launcher
                  behind `meshplan replay` (`replay`); free of torch, as is this file, so the CLI
                  can refuse a plan before any process starts
- ``job.py``      a rank's job (`run`): process group, model shard and groups, step loop, results
- ``context.py``  a rank's state (Context), its optimizer, how it names its failure
- ``step.py``     one step: the units (packed or context-parallel), gradient sync, optimizer
- ``check.py``    `--check`: the single-process reference and the comparison with it
- ``model.py``    the decoder (ModelConfig: a ModelSpec, precision, recompute), generated or file tokens
- ``cp.py`` ``stages.py`` ``tp.py`` ``offload.py``   context parallelism, pipeline stages, tensor
                  parallelism, activation offload
- ``trace.py``    the measured trace rank 0 writes"""

from planner.runtime.launch import (BLOCK_KERNELS, CP_IMPLS, OPTIMIZERS, PRECISIONS, InjectedFailure,
                                    ReplayFailure, ReplayOptions, preflight, replay)

__all__ = ["BLOCK_KERNELS", "CP_IMPLS", "OPTIMIZERS", "PRECISIONS", "InjectedFailure", "ReplayFailure",
           "ReplayOptions", "preflight", "replay"]

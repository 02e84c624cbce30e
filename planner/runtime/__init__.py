"""The torch executor: replays a plan under torchrun (`python -m planner.runtime plan.json`).

The only package besides profiles/measure that imports torch; it reads plans (planner/plan) and
never imports strategies (plan-ahead calls the planner's API, `ahead.py`). Where each part lives:

- ``launch.py``   options, the checks before any rank works (preflight), the torchrun launcher
                  behind `meshplan replay` (`replay`); free of torch, as is this file, so the CLI
                  can refuse a plan before any process starts
- ``job.py``      a rank's job (`run`): process group, model shard and groups, step loop, results
- ``feed.py``     where each iteration's step comes from: the plan JSON, a plan stream read per step, or
                  plan-ahead (rank 0 plans step t+1 while step t runs and sends each rank its part)
- ``ahead.py``    plan-ahead's planner: the plan's own request through `planner.api` (torch-free)
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

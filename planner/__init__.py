"""The planner: from a length source and a cost model to a validated plan, and what follows from it.

Where each part lives, in the order data flows through them (each package's __init__ maps its modules):

- ``workload/``   tokens.py (K/M sizes), readers.py (file formats), families.py (synthetic lengths),
                  sources.py (named and file sources), batch.py (global batches per step)
- ``strategies/`` options.py, common.py (shared drafting), static / dcp / hdp / ilp: a batch -> a Step;
                  registry.py (by name), outcome.py (a step and its solver report)
- ``plan/``       schema.py (typed plan, pipeline section, JSON I/O), validate.py (the contract's rules)
- ``schedule/``   ops.py (pipeline op lists), engine.py (the event engine), uniform.py (closed forms)
- ``simulate/``   step.py -> flat.py | pipelined.py; memory.py, bounds.py, timeline.py (traces),
                  measured.py (predicted vs measured)
- ``api.py``      requests -> cost model, batches, plans, comparisons (what the CLI calls)
- ``studies/``    sweep.py, journal.py, workers.py, fingerprint.py, capacity.py, bytescale.py
- ``report/``     figures.py, documents.py (presentation only)
- ``runtime/``    launch.py (torch-free: preflight, torchrun), job.py, step.py, check.py, cp.py, stages.py,
                  tp.py, offload.py, trace.py: the torch executor that replays a plan under torchrun

The mesh layout (global rank <-> stage, HDP rank, TP rank; which sets cross a node) is costmodel.mesh.
"""

"""The planner: from a length source and a cost model to a validated plan, and what follows from it.

Where each part lives, in the order data flows through them:

- ``workload/``   length readers, synthetic families, sources, global batches per step
- ``strategies/`` static, dcp, hdp (naive, balance), ilp: a global batch -> a Step
- ``plan/``       the plan file: typed schema, JSON I/O, validate()
- ``schedule/``   pipeline op lists (1F1B, interleaved, sliced) and the event engine they run on
- ``simulate/``   a Step on the cost model: timelines, memory, lower bounds, predicted vs measured
- ``api.py``      requests -> cost model, batches, plans, comparisons (what the CLI calls)
- ``studies/``    what-if sweeps, capacity search, the ByteScale reproduction
- ``report/``     figures and Markdown documents (presentation only)
- ``runtime/``    the torch executor that replays a plan under torchrun
"""

"""Capacity search: the smallest GPU count (and a tp, pp) whose plan meets a target.

The layout rules, the same at every GPU count:
  * GPU counts: one node × 2^k, from `min_gpus` (default one node) to `max_gpus`, in increasing order;
  * layouts: tp in {1, 2, 4, 8} dividing the NVLink domain (a node; a 72-GPU GB200 NVL72 rack, whose
    4-GPU trays allow tp 8: costmodel.mesh keeps TP groups inside a domain) and valid for the model's heads,
    pp in {1, 2, 4, 8} dividing the layers, tp·pp dividing the GPU count. Powers of two, so a layout
    allowed at G is allowed at every larger count;
  * memory feasibility is monotone in G for a fixed layout (ZeRO-1 states shrink as the HDP ranks
    grow, so C grows, and more ranks hold longer sequences); tests/planner/studies/test_capacity.py checks it;
  * a layout meets the target only when it plans and its simulated peak memory fits the HBM;
  * a layout whose step-time lower bound (planner/simulate/bounds.py) already misses the target is not planned
    (sound pruning; the cheap work term is tried first, the full bound in the worker before planning);
  * the others are planned cheapest first (fewer pipeline stages), best bound first among equals;
  * the answer is the first count, in increasing order, with a layout that meets the target: every layout
    of every smaller count was decided, so no smaller count on these rules meets it, and a harder target
    never gets a smaller answer. Larger counts are not planned. At the answer's count the search stops at
    the first layout that meets the target (the rest: status 'skipped'), or, with best_layout, plans every
    layout whose bound could beat the best found (the rest: 'bounded'), so the layout is the count's best.
  * planned layouts are journaled like sweep points (same Journal, same keys), so a rerun plans nothing
    twice; the rows and the answer do not depend on the journal or the number of workers (workers may
    plan a layout ahead that then goes unused: it is journaled for later runs).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import tempfile
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pandas as pd

from costmodel.flops import training_flops
from costmodel.presets import load_cluster, load_model
from costmodel.specs import SpecError, TrainingSpec
from costmodel.timing import CostModel
from planner.api import BYTESCALE_TOKENS_PER_STEP
from planner.plan import PlanError
from planner.simulate import lower_bound_s, total_compute_s
from planner.studies.journal import Journal
from planner.studies.sweep import (NO_FLAGS, POINT_ERRORS, Config, Point, TrainingFlags, base_row, batches_of,
                                   check_inputs, cost_model_of, evaluate_point, priced_fields)
from planner.studies.workers import worker_pool
from planner.workload import GlobalBatch

Metric = Literal["tokens_per_s", "step_time_s", "mfu"]


@dataclass(frozen=True)
class LayoutBound:
    """What no plan of a layout can beat: its mean step time is at least step_time_s, so its tokens/s and
    MFU are at most these."""

    step_time_s: float
    tokens_per_s: float
    mfu: float


def layout_bound(cm: CostModel, batches: list[GlobalBatch], full: bool = True) -> LayoutBound:
    """Bound of a layout on the sampled batches. full=False keeps only the work term of
    planner.simulate.bounds.lower_bound_s (compute spread over every rank, plus the gradient sync): weaker but 10-100x
    cheaper, it skips the search over the longest sequence's degree."""
    if full:
        lb = float(np.mean([lower_bound_s(b.lengths_tokens, cm, cm.setup.hdp) for b in batches]))
    else:
        lb = float(np.mean([total_compute_s(b.lengths_tokens, cm) / (cm.setup.hdp * cm.pp) for b in batches]))
        lb += cm.step_end_s(cm.setup.hdp)
    tokens = float(np.mean([b.total_tokens for b in batches]))
    flops = float(np.mean([training_flops(b.lengths_tokens, cm.setup, True) for b in batches]))
    return LayoutBound(lb, tokens / lb, flops / (lb * cm.setup.cluster.world_size * cm.peak_flops()))


@dataclass(frozen=True)
class Target:
    """What the capacity search must reach: tokens/s ≥ v, step time ≤ v, or MFU (halved) ≥ v."""

    metric: Metric
    value: float

    def __post_init__(self) -> None:
        if self.metric not in ("tokens_per_s", "step_time_s", "mfu") or not (0 < self.value < math.inf):
            raise PlanError(f"capacity target must be tokens_per_s, step_time_s or mfu with a positive finite value, "
                            f"got {self.metric}={self.value!r}")
        if self.metric == "mfu" and self.value > 1:
            raise PlanError(f"MFU target {self.value:g} is above 100%; give a fraction (0.4) or a percentage (40)")

    def key(self, value: float) -> float:
        """Order of the metric's values: smaller is better."""
        return value if self.metric == "step_time_s" else -value

    def reached_by(self, value: float) -> bool:
        return self.key(value) <= self.key(self.value)

    def met(self, row: dict) -> bool:
        v = row.get(self.metric)
        if not row.get("feasible") or not row.get("fits_hbm") or v is None or not math.isfinite(v):
            return False
        return self.reached_by(v)

    def sort_key(self, row: dict) -> float:
        """Smaller is better."""
        return self.key(row[self.metric])

    def reachable(self, bound: LayoutBound) -> bool:
        """False when even the layout's bound misses the target: no plan of it can reach it."""
        return self.reached_by(getattr(bound, self.metric))

    def describe(self) -> str:
        if self.metric == "tokens_per_s":
            return f"tokens/s >= {self.value:,.0f}"
        if self.metric == "step_time_s":
            return f"step time <= {self.value:g} s"
        return f"MFU >= {self.value:.1%}"

    def format(self, value: float) -> str:
        return (f"{value:,.0f} tokens/s" if self.metric == "tokens_per_s" else f"{value:.3g} s/step"
                if self.metric == "step_time_s" else f"MFU {value:.1%}")


@dataclass(frozen=True)
class LayoutRules:
    """The (GPU count, tp, pp) grid of the capacity search; see the module docstring."""

    tps: tuple[int, ...] = (1, 2, 4, 8)
    pps: tuple[int, ...] = (1, 2, 4, 8)
    min_gpus: int | None = None  # None: one node
    max_gpus: int = 16384
    ep: int = 1  # MoE: the most expert parallelism; each layout takes min(ep, tp)

    def __post_init__(self) -> None:
        for name, values in (("tp", self.tps), ("pp", self.pps)):
            if not values or any(int(v) != v or v < 1 for v in values):
                raise PlanError(f"capacity search: {name} degrees must be positive integers, got {list(values)}")
        if self.min_gpus is not None and self.min_gpus < 1:
            raise PlanError(f"capacity search: min GPUs must be at least 1, got {self.min_gpus}")
        if self.max_gpus < 1:
            raise PlanError(f"capacity search: max GPUs must be at least 1, got {self.max_gpus}")
        if self.min_gpus is not None and self.min_gpus > self.max_gpus:
            raise PlanError(f"capacity search: min GPUs {self.min_gpus} is larger than max GPUs {self.max_gpus}")

    def gpu_counts(self, cluster: str) -> list[int]:
        per_node = load_cluster(cluster).gpus_per_node
        lo = self.min_gpus or per_node
        if lo < per_node:  # partial nodes: powers of two up to a node
            counts = [g for g in (2 ** k for k in range(0, 31)) if lo <= g < per_node]
        else:
            counts = []
        g = per_node
        while g <= self.max_gpus:
            if g >= lo:
                counts.append(g)
            g *= 2
        counts = [g for g in counts if g <= self.max_gpus]
        if not counts:
            raise PlanError(f"capacity search: no GPU count between {lo} and {self.max_gpus} (counts are powers of "
                            f"two up to a node, then {per_node}-GPU nodes x 2^k)")
        return counts

    def layouts(self, model: str, cluster: str, gpus: int) -> list[tuple[int, int]]:
        m, c = load_model(model), load_cluster(cluster).with_gpus(gpus)
        out = []
        for tp, pp in itertools.product(sorted(self.tps), sorted(self.pps)):
            try:
                TrainingSpec(tp=tp, pp=pp, ep=min(self.ep, tp)).check_against(m, c)
            except SpecError:
                continue
            out.append((tp, pp))
        return sorted(out, key=lambda x: (x[0] * x[1], x[1]))


@dataclass(frozen=True)
class CapacityProgress:
    """Where a capacity search stands, for progress displays."""

    gpus: int  # the GPU count being searched
    count_index: int  # its position among the rules' counts, from 1
    counts: int  # GPU counts the rules allow (the search stops at the first that meets the target)
    count_done: int  # layouts decided at this count
    count_total: int  # layouts at this count
    done: int  # layouts decided over all counts
    total: int  # layouts over all counts
    activity: str  # what runs now, e.g. "planning tp1 pp1"


@dataclass
class CapacityResult:
    target: Target
    answer: dict | None  # the smallest GPU count's best planned layout meeting the target (a sweep row + status)
    runners_up: list[dict]  # other planned layouts meeting it (never from counts beyond the answer's)
    table: pd.DataFrame  # every (gpus, tp, pp) decided, by count then layout; status in CAPACITY_STATUSES
    rules: LayoutRules
    planned: int = 0  # layouts planned by this run
    reused: int = 0  # layouts whose row came from the journal

    def not_planned(self) -> pd.DataFrame:
        """Layouts at the answer's count left unplanned once it met the target (status 'skipped')."""
        return self.table[self.table["status"] == "skipped"] if len(self.table) else self.table


CAPACITY_STATUSES = {
    "meets": "planned; fits the HBM and meets the target",
    "misses": "planned; fits the HBM but misses the target",
    "over-hbm": "planned; the simulated peak memory exceeds the HBM",
    "infeasible": "cannot be planned (the reason says why)",
    "pruned": "not planned: its lower bound already misses the target",
    "bounded": "not planned: its bound cannot beat the answer found at the same count",
    "skipped": "not planned: the count already meets the target (--best-layout plans it)",
}


def default_capacity_table() -> Path:
    """Where `meshplan whatif capacity` journals its layouts unless --table is given (outside the repo)."""
    return Path(tempfile.gettempdir()) / "meshplan-capacity" / "capacity.csv"


def capacity_search(model: str, context_tokens: int, target: Target, *, cluster: str = "dgx-h100",
                    lengths: str = "byted-like", strategy: str = "hdp", rules: LayoutRules = LayoutRules(),
                    tokens_per_step: int = BYTESCALE_TOKENS_PER_STEP, steps: int = 2, seed: int = 0,
                    recompute: str = "auto", offload: bool = True, attention_kernel: str = "flash",
                    loss: str = "online", grad_accumulation: str = "fused", recompute_modules: str = "",
                    flags: TrainingFlags = NO_FLAGS, runners_up: int = 5, best_layout: bool = False,
                    exhaustive: bool = False, workers: int = 1, journal: Path | None = None,
                    on_progress: Callable[[CapacityProgress], None] | None = None) -> CapacityResult:
    """Smallest GPU count (and a tp, pp) whose `strategy` plan meets `target`, scanning the rules' counts in
    increasing order and stopping at the first count that meets it: every smaller count was decided, so it is
    minimal. Layouts whose bound misses the target are not planned; the others are planned cheapest first
    (fewer pipeline stages: PP plans cost far more), best bound first among equals. At the answer's count the
    search stops at the first layout that meets the target (the others are 'skipped'), or with best_layout
    plans every layout whose bound could beat the best so far (the others are 'bounded'). exhaustive=True
    plans every count and layout. workers > 1 plans layouts in worker processes (same rows, same answer).
    journal: JSON-lines file of planned layouts (Journal, shared with sweeps); a rerun reuses its rows."""
    counts = rules.gpu_counts(cluster)
    # unknown strategy, model, length source or a kernel the profile has no rate for: once, before any planning
    check_inputs([Point(Config(model, cluster, counts[0], tp, pp, context_tokens, lengths,
                               recompute=recompute, attention_kernel=attention_kernel, loss=loss,
                               grad_accumulation=grad_accumulation, recompute_modules=recompute_modules,
                               ep=min(rules.ep, tp), flags=flags), strategy)
                  for tp in rules.tps for pp in rules.pps])
    layouts = {g: rules.layouts(model, cluster, g) for g in counts}
    if not any(layouts.values()):
        raise PlanError(f"capacity search: no tp in {list(rules.tps)} and pp in {list(rules.pps)} is valid for "
                        f"{model} on {cluster} (tp must divide the heads and the NVLink domain; pp at most the layers)")
    search = _CapacitySearch(target, strategy, Journal(journal) if journal else None, exhaustive, best_layout,
                             on_progress, sum(len(v) for v in layouts.values()), len(counts))
    # Workers start now: they import while this process bounds the small counts (lazily: 30% slower on 2 cores).
    with worker_pool(workers) if workers > 1 else contextlib.nullcontext(None) as pool:
        for i, gpus in enumerate(counts, 1):
            cfgs = [Config(model, cluster, gpus, tp, pp, context_tokens, lengths, tokens_per_step, steps, seed,
                           recompute, offload, ep=min(rules.ep, tp), attention_kernel=attention_kernel, loss=loss,
                           grad_accumulation=grad_accumulation, recompute_modules=recompute_modules, flags=flags)
                    for tp, pp in layouts[gpus]]
            if search.decide_count(gpus, i, cfgs, pool, workers) and not exhaustive:
                break
    rows = search.rows
    meeting = sorted((r for r in rows if r["status"] == "meets"),
                     key=lambda r: (r["gpus"], target.sort_key(r), r["tp"] * r["pp"], r["pp"]))
    return CapacityResult(target, meeting[0] if meeting else None, meeting[1:1 + runners_up], pd.DataFrame(rows),
                          rules, search.planned, search.reused)


class _CapacitySearch:
    """State of one capacity search: the rows decided so far, the journal, counters for progress and the report."""

    def __init__(self, target: Target, strategy: str, journal: Journal | None, exhaustive: bool, best_layout: bool,
                 on_progress: Callable[[CapacityProgress], None] | None, total: int, counts: int) -> None:
        self.target, self.strategy, self.journal = target, strategy, journal
        self.exhaustive, self.best_layout, self.on_progress = exhaustive, best_layout, on_progress
        self.known = journal.load(current_only=True) if journal else {}  # planned rows by point key
        self.journaled = frozenset(self.known)  # keys planned before this run (rows planned now join `known`)
        self.rows: list[dict] = []
        self.planned = self.reused = self.done = 0
        self.total, self.counts = total, counts

    def decide_count(self, gpus: int, index: int, cfgs: list[Config], pool: ProcessPoolExecutor | None,
                     workers: int) -> bool:
        """Decide every layout of one GPU count; True when one meets the target. Rows go to self.rows in the
        rules' order; which layouts get planned depends only on the inputs (not on workers or the journal)."""
        decided: dict[Config, dict] = {}

        def show(activity: str) -> None:
            if self.on_progress:
                self.on_progress(CapacityProgress(gpus, index, self.counts, len(decided), len(cfgs), self.done,
                                                  self.total, activity))

        def decide(cfg: Config, row: dict) -> dict:
            decided[cfg] = row = self._with_status(row)
            self.done += 1
            show(f"tp{cfg.tp} pp{cfg.pp}: {row['status']}")
            return row

        candidates: list[tuple[Config, LayoutBound | None]] = []
        for cfg in cfgs:
            show(f"bounding tp{cfg.tp} pp{cfg.pp}")
            row, bound = self._without_planning(cfg)
            if row is not None:
                decide(cfg, row)
            else:
                candidates.append((cfg, bound))
        # Cheapest first (PP plans cost 10-100x more), best bound first among equals: an early hit is cheap.
        candidates.sort(key=lambda c: (c[0].pp, self._bound_key(c[1]), c[0].tp))
        tasks = [(cfg, self.strategy, self.target, not self.exhaustive) for cfg, _ in candidates
                 if Point(cfg, self.strategy).key not in self.journaled]
        runner = _LayoutRunner(pool, workers, self._record)
        runner.start(tasks)
        best: dict | None = None
        for cfg, bound in candidates:
            key = Point(cfg, self.strategy).key
            reason = None if best is None or self.exhaustive else self._why_not_planned(gpus, bound, best)
            if reason is not None:
                runner.drop(key)
                decide(cfg, self._unplanned(cfg, bound, *reason))
                continue
            if key in self.journaled:  # not a row a worker planned ahead in this run: that one is the runner's
                self.reused += 1
                row = dict(self.known[key])
            else:
                show(f"planning tp{cfg.tp} pp{cfg.pp}" + (f" (+{runner.busy() - 1} ahead)" if runner.busy() > 1
                                                          else ""))
                row = runner.result(key)
            row = decide(cfg, row)
            if row["status"] == "meets" and (best is None or self.target.sort_key(row) < self.target.sort_key(best)):
                best = row
        runner.stop()
        self.rows.extend(decided[cfg] for cfg in cfgs)
        return best is not None

    def _without_planning(self, cfg: Config) -> tuple[dict | None, LayoutBound | None]:
        """The row of a layout decided without planning (no cost model: infeasible; the work bound misses:
        pruned), else its work bound (None when exhaustive). Computed even for journaled layouts: the
        order of planning, and so the answer, must not depend on what the journal holds."""
        point = Point(cfg, self.strategy)
        try:
            cm = cost_model_of(cfg)
            batches = batches_of(cfg)
        except POINT_ERRORS:
            if point.key in self.journaled:
                self.reused += 1
                return dict(self.known[point.key]), None
            return self._record(evaluate_point(point)), None  # the failure, recorded the sweep's way
        if self.exhaustive:
            return None, None
        bound = layout_bound(cm, batches, full=False)
        if not self.target.reachable(bound):
            return _pruned_row(point, cm, bound, self.target, "compute spread over every rank"), None
        return None, bound

    def _bound_key(self, bound: LayoutBound | None) -> float:
        return self.target.key(getattr(bound, self.target.metric)) if bound is not None else 0.0

    def _why_not_planned(self, gpus: int, bound: LayoutBound | None, best: dict) -> tuple[str, str] | None:
        """(status, reason) of a layout left unplanned once `best` met the target at its count, else None."""
        if not self.best_layout:
            return "skipped", f"not planned: {gpus} GPUs already meet {self.target.describe()}"
        if bound is not None and self._bound_key(bound) >= self.target.sort_key(best):
            return "bounded", (f"bound {self.target.format(getattr(bound, self.target.metric))} cannot beat "
                               f"tp{best['tp']} pp{best['pp']}")
        return None

    def _record(self, row: dict) -> dict:
        """Journal a planned row as soon as it exists (pruned rows are target-dependent and not journaled)."""
        if "status" not in row:
            self.planned += 1
            if self.journal:
                self.journal.append(row)
            self.known[row["key"]] = row
        return row

    def _with_status(self, row: dict) -> dict:
        if "status" not in row:
            row = dict(row, status="infeasible" if not row["feasible"] else "over-hbm" if not row["fits_hbm"]
                       else "meets" if self.target.met(row) else "misses")
        return row

    def _unplanned(self, cfg: Config, bound: LayoutBound | None, status: str, reason: str) -> dict:
        row = base_row(Point(cfg, self.strategy))
        row.update(feasible=None, status=status, reason=reason, lower_bound_s=bound.step_time_s if bound else None)
        return row


def _pruned_row(point: Point, cm: CostModel, bound: LayoutBound, target: Target, term: str) -> dict:
    row = base_row(point)
    row.update(priced_fields(cm), lower_bound_s=bound.step_time_s, feasible=None, status="pruned",
               reason=f"lower bound {bound.step_time_s:.3g} s/step ({term}) cannot reach {target.describe()}")
    return row


def _decide_layout(cfg: Config, strategy: str, target: Target, prune: bool) -> dict:
    """Plan one layout unless its full lower bound misses the target (then a 'pruned' row). Runs in workers."""
    point = Point(cfg, strategy)
    if prune:
        cm = cost_model_of(cfg)  # the caller built it already: it does not fail
        bound = layout_bound(cm, batches_of(cfg))
        if not target.reachable(bound):
            return _pruned_row(point, cm, bound, target, "the longest sequence at its best degree")
    return evaluate_point(point)


class _LayoutRunner:
    """Runs `_decide_layout` on tasks in their given order: here when a result is asked for, or in a pool
    keeping up to `ahead` tasks running, so the next ones are planned while the awaited one finishes. Each row
    goes to `on_done` (the journal) as soon as it exists, whatever order they finish in."""

    def __init__(self, pool: ProcessPoolExecutor | None, ahead: int, on_done: Callable[[dict], dict]) -> None:
        self.pool, self.ahead, self.on_done = pool, max(1, ahead), on_done
        self.queued: dict[str, tuple] = {}  # point key -> task, in order, not submitted yet
        self.running: dict[str, Future] = {}
        self.rows: dict[str, dict] = {}

    def start(self, tasks: list[tuple]) -> None:
        self.queued = {Point(t[0], t[1]).key: t for t in tasks}
        self._top_up()

    def busy(self) -> int:
        return len(self.running)

    def drop(self, key: str) -> None:
        """The task is no longer needed: never start it (if it runs, its row is still journaled)."""
        self.queued.pop(key, None)
        f = self.running.get(key)
        if f is not None and f.cancel():
            del self.running[key]

    def result(self, key: str) -> dict:
        if key in self.rows:  # finished ahead
            return self.rows.pop(key)
        if self.pool is None:
            return self.on_done(_decide_layout(*self.queued.pop(key)))
        while key not in self.rows:
            if key not in self.running:
                self.running[key] = self.pool.submit(_decide_layout, *self.queued.pop(key))
            wait(list(self.running.values()), return_when=FIRST_COMPLETED)
            self._collect()
            self._top_up()
        return self.rows.pop(key)

    def stop(self) -> None:
        """Cancel tasks not started, keep the rows of those that finished; the pool's owner ends the rest."""
        self.queued.clear()
        for f in self.running.values():
            f.cancel()
        self._collect()

    def _collect(self) -> None:
        for k, f in list(self.running.items()):
            if f.done():
                del self.running[k]
                if not f.cancelled():
                    self.rows[k] = self.on_done(f.result())

    def _top_up(self) -> None:
        while self.pool is not None and self.queued and len(self.running) < self.ahead:
            key = next(iter(self.queued))
            self.running[key] = self.pool.submit(_decide_layout, *self.queued.pop(key))


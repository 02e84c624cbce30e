"""What produced a figure: the planning code and data behind a sweep row, and the machine behind a timing."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
from pathlib import Path

from planner.strategies import STRATEGIES
from profiles.measure import cpu_model_name

# Packages that do not change a point's figures: the executor, measurement, presentation, and the
# studies themselves (they choose points; planning and costing them happens elsewhere).
_NOT_PLANNING = ("planner/runtime/", "planner/report/", "planner/studies/", "profiles/measure/")
# common.py and options.py shape every strategy; every row carries static's time (its speedup reference)
_SHARED_STRATEGY_FILES = {"common.py", "options.py", "static.py", "cp_kinds.py", "registry.py", "rounds.py"}


@functools.lru_cache(maxsize=None)
def code_fingerprint(strategy: str | None = None) -> str:
    """sha256 (12 hex digits) of the sources and data files that determine a point's figures: costmodel,
    profiles, presets, planner, and of the strategies only the shared helpers, static and `strategy`'s
    own module or package (None: all of them), so work on one strategy does not invalidate another's rows."""
    root = Path(__file__).resolve().parents[2]
    strategies_dir = root / "planner" / "strategies"
    own = None
    if strategy is not None:
        if strategy not in STRATEGIES:
            return ""
        own = Path(sys.modules[STRATEGIES[strategy].__module__].__file__).resolve()
        if own.name == "__init__.py":  # a strategy package (ilp): all of its modules are its own
            own = own.parent
    h = hashlib.sha256()
    for pkg in ("costmodel", "planner", "profiles"):
        for f in sorted((root / pkg).rglob("*")):
            rel = f.relative_to(root).as_posix()
            if (f.suffix not in (".py", ".json", ".gz") or not f.is_file()
                    or rel.startswith(_NOT_PLANNING) or "__pycache__" in rel):
                continue
            top = strategies_dir / f.relative_to(strategies_dir).parts[0] if strategies_dir in f.parents else None
            if own is not None and top is not None and top.name not in _SHARED_STRATEGY_FILES and top.resolve() != own:
                continue
            h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def machine_description() -> str:
    """CPU model and core count of this machine, for benchmark records."""
    return (f"{os.cpu_count()}-core {cpu_model_name()}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")

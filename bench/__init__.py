"""skyvm's benchmarks: ``python -m bench SCENARIO [--n N] [--reps R] [--smoke]`` (see ``python -m bench list``).

Each scenario runs skyvm and what it is compared with alternately, in one process run, for
several repetitions; prints medians, ratios and its targets (pass / miss); and writes
``bench/results/<scenario>-<YYYYmmdd-HHMMSS>.json`` (machine, date, commit, parameters, every
sample). ``--smoke`` is a tiny version of each that asserts only that it ran and its results
are right.

Scenarios register themselves in ``SCENARIOS`` (name -> Scenario, a callable taking a
``bench.common.Bench``) with the ``@scenario`` decorator; every module of this package is
imported by ``load()``, so a new scenario is one new file (bench/faults.py, say) with a
decorated function. Keep the scenario modules' top-level imports to the standard library and
``bench.common``: engines and SDKs are imported inside the functions, so that listing works in
every environment.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

# Which of ./dev's environments a scenario belongs to (`python -m bench all` runs those of the current one).
ENVS = ("core", "prefect", "airflow", "skypilot")


@dataclass
class Scenario:
    name: str
    fn: Callable
    env: str
    help: str
    n: int  # default size (nodes, MiB, ...), overridden by --n
    reps: int  # default repetitions, overridden by --reps
    smoke_n: int
    smoke_reps: int = 1
    in_all: bool = True  # part of `python -m bench all`
    n_means: str = "nodes"
    options: dict = field(default_factory=dict)  # --set KEY=VALUE defaults, documented in `list`

    def __call__(self, bench) -> None:
        self.fn(bench)


SCENARIOS: dict[str, Scenario] = {}

# Not scenario modules: imported by them, or scripts kept for their own command lines.
_NOT_SCENARIOS = {"common", "nodefns", "__main__", "local_latency"}


def scenario(name: str, *, env: str, help: str, n: int, reps: int, smoke_n: int, smoke_reps: int = 1, in_all: bool = True, n_means: str = "nodes", options=None):
    """Register a scenario: ``fn(bench)`` records samples, comparisons and targets on ``bench``."""
    assert env in ENVS, env

    def register(fn: Callable) -> Callable:
        SCENARIOS[name] = Scenario(name, fn, env, help, n, reps, smoke_n, smoke_reps, in_all, n_means, dict(options or {}))
        return fn

    return register


def load() -> dict[str, Scenario]:
    """Import every module of this package, so their scenarios register."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_SCENARIOS:
            importlib.import_module(f"{__name__}.{info.name}")
    return SCENARIOS

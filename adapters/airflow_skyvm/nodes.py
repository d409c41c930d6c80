"""What names a task instance's node, shared by the operator and the executor.

Kept apart from the operator's module: importing that one hands every secret skyvm reads to
Airflow's masker (``masking.install()``), which a task's process wants and a scheduler, whose
executor reads one workload secret per task, must not keep for its whole life.

Holds ``node_name``. May import: nothing.
"""

from __future__ import annotations


def node_name(ti) -> str:
    """A task instance's node name: its task_id, plus the map index of a mapped task."""
    map_index = getattr(ti, "map_index", -1)
    return ti.task_id if map_index in (-1, None) else f"{ti.task_id}-{map_index}"

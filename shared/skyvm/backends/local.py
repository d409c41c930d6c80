"""The local backend's names in one place: the backend for this machine, and what tools and tests ask of it.

The rooms themselves: ``skyvm.backends.containers`` (the Docker backend),
``skyvm.backends.processes`` (plain processes where no engine answers), ``skyvm.engine`` (the
Docker engine client), ``skyvm.capacity`` (this machine's capacity), ``skyvm.maintenance``
(status and gc), ``skyvm.home`` (the install's state), ``skyvm.backends.registry`` (which
backend object the process uses).

Holds: ``home_id`` and re-exports only.
May import: the rooms above.
"""

from __future__ import annotations

import os
from typing import Optional

from skyvm.backends.containers import DockerBackend, local_cluster_name
from skyvm.backends.processes import ProcessBackend
from skyvm.backends.registry import local_backend
from skyvm.capacity import check_satisfiable
from skyvm.engine import docker, docker_available, same_path_volumes
from skyvm.home import Home
from skyvm.maintenance import gc, gc_clusters, gc_images, list_managed

__all__ = [
    "DockerBackend", "ProcessBackend", "check_satisfiable", "docker", "docker_available", "gc", "gc_clusters", "gc_images",
    "home_id", "list_managed", "local_backend", "local_cluster_name", "same_path_volumes",
]


def home_id(home: Optional[os.PathLike] = None) -> str:
    """The install's id: a hash of its home's resolved path (this process's ``SKYVM_HOME`` by default)."""
    return (Home(home) if home else Home.current()).id

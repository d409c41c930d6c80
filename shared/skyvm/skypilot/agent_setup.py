"""What a SkyPilot cluster's agent needs from its launch, and where it keeps things on the cluster.

A cluster skyvm launches with its own node image starts ``skyvm.agent`` in its container at the end of
``setup`` (``with_agent``), with a key this launcher made (a task secret, never on argv, kept on this
host under ``agent_dir``), its socket at ``REMOTE_SOCKET``, and the payload store's file system
imported ahead of the nodes. A node the agent runs leaves its result under ``REMOTE_RESULTS``, read
back over the cluster's SSH connection (``skyvm.skypilot.agents``).

Holds: ``with_agent``, ``agent_start``, ``agents_enabled``, ``result_path`` and the cluster-side paths.
May import: the standard library, skyvm.backends.agent_channel.
"""

from __future__ import annotations

import os
import shlex
from typing import Optional

from skyvm.backends.agent_channel import agent_dir, new_key

REMOTE_DIR = "/tmp/skyvm-agent"
REMOTE_SOCKET = f"{REMOTE_DIR}/agent.sock"
# Where a node the agent runs leaves its result (in the agent's own directory: this user's alone).
REMOTE_RESULTS = f"{REMOTE_DIR}/results"
KEY_SECRET = "SKYVM_AGENT_KEY"

# The payload store's file system, imported by the agent before it forks: not by every node.
STORE_MODULES = {"s3": "s3fs", "gs": "gcsfs", "az": "adlfs"}
# The agent started with modules imported first (argv[1], comma-separated; one that fails is left to the node).
_WITH_PRELOAD = (
    "import importlib, runpy, sys\n"
    "for name in filter(None, sys.argv[1].split(',')):\n"
    "    try:\n        importlib.import_module(name)\n    except Exception as exc:\n"
    "        print(f'skyvm.agent: preloading {name} failed: {exc}', file=sys.stderr)\n"
    "sys.argv = ['skyvm.agent', *sys.argv[2:]]\n"
    "runpy.run_module('skyvm.agent', run_name='__main__', alter_sys=True)\n"
)


def agent_start(preload: str) -> str:
    """The end of a launch's setup: the agent in the background (its own session: it outlives setup), the
    key from the task's secret into a file of its own, the secret itself kept from the nodes it forks; then
    a wait until it listens."""
    return (
        f"mkdir -p {REMOTE_DIR} && chmod 700 {REMOTE_DIR} && (umask 077 && printf %s \"${KEY_SECRET}\" > {REMOTE_DIR}/key) "
        f"&& command -v python3 > {REMOTE_DIR}/python "
        f"&& env -u {KEY_SECRET} setsid nohup python3 -c {shlex.quote(_WITH_PRELOAD)} {shlex.quote(preload)} --socket {REMOTE_SOCKET} "
        f"--key-file {REMOTE_DIR}/key > {REMOTE_DIR}/agent.log 2>&1 < /dev/null &\n"
        # Setup ends once the agent listens (60 s at most; one that never does leaves nodes to sky exec): the
        # cluster's first node may go to it at once (a node that reaches the launcher's API over SSH does).
        f"i=0; while [ ! -S {REMOTE_SOCKET} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; true"
    )


# The node runtime's commands over SSH: with the Python the agent runs (an SSH session's PATH is not the image's).
NODE_CMD = f'"$(cat {REMOTE_DIR}/python 2>/dev/null || echo python3)" -m skyvm.node'


def agents_enabled() -> bool:
    return os.environ.get("SKYVM_AGENT", "1") != "0"


def managed(settings) -> bool:
    """Spot with a recovery strategy: a SkyPilot managed job, so preemptions are SkyPilot's to recover."""
    return bool(settings.use_spot) and settings.job_recovery is not None and str(settings.job_recovery).upper() != "NONE"


def warm_path(settings) -> str:
    """How a node of these settings reaches a warm cluster of its signature (``skyvm plan`` shows it)."""
    if settings.pool is not None:
        return "managed job on a pool worker"
    if managed(settings):
        return "managed job (spot recovery)"
    if settings.image_id is not None:
        return "sky exec (a VM image_id: no agent)"
    if not agents_enabled():
        return "sky exec (SKYVM_AGENT=0)"
    return "agent over SSH"


def agent_applies(task: dict) -> bool:
    """Whether a launch of ``task`` starts an agent: skyvm's own container image, with a setup to start it from."""
    image = str((task.get("resources") or {}).get("image_id") or "")
    return agents_enabled() and image.startswith("docker:") and bool(task.get("setup"))


def with_agent(task: dict, cluster: str, store: Optional[str] = None) -> dict:
    """The launch's task with the agent started at the end of its setup (a container of skyvm's runtime only),
    the file system of the payload store ``store`` imported by it ahead of the nodes."""
    if not agent_applies(task):
        return task
    key = new_key(agent_dir(cluster)).decode()
    preload = ",".join(["skyvm.payloads", STORE_MODULES.get(str(store or "").partition("://")[0], "")]).rstrip(",")
    return {**task, "setup": f"{task['setup']}\n{agent_start(preload)}", "secrets": {**task.get("secrets", {}), KEY_SECRET: key}}


def result_path(attempt: str) -> str:
    """Where on the cluster the attempt's result is (attempt ids are safe in file names: prepare.new_attempt_id)."""
    return f"{REMOTE_RESULTS}/{attempt}"

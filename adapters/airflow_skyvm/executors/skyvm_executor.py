"""``SkyVMExecutor``: every task instance's workload runs on its own skyvm node.

    [core]
    executor = airflow_skyvm.executors.skyvm_executor.SkyVMExecutor
    # or beside another: executor = LocalExecutor,airflow_skyvm.executors.skyvm_executor.SkyVMExecutor
    # and executor="SkyVMExecutor" on the tasks that should run on nodes

Per task, settings come from the shared settings YAML (``nodes[task_id]``,
``[skyvm] settings_file`` or ``$SKYVM_CONFIG``) with ``executor_config={"skyvm":
{...}}`` above them. The node runs ``python -m airflow.sdk.execution_time.execute_workload``
(Airflow's Task SDK), so:

- the node must reach Airflow's execution API: ``[core] execution_api_server_url``
  (on the local backend the node shares the host's network, so loopback works;
  on a cloud VM it must be an address the VM can reach);
- the node image gets ``apache-airflow-task-sdk`` at the version installed here
  (added to the node's ``requirements``), and the DAG bundle must be at the same
  path on the node (the local backend mounts the DAGs folder and the log folder);
- the workload's token is valid for ``[scheduler] task_queued_timeout``:
  provisioning must fit in it;
- each resume after a deferral is a new workload, so a new node.

When the scheduler stops, ``end()`` waits for the running nodes at most ``[skyvm]
executor_end_timeout`` seconds (default 60; keep it under the deployment's stop grace
period), then names the tasks still running, cancels their nodes and fails them.

Holds ``SkyVMExecutor``. May import: airflow's executor base and configuration, airflow_skyvm.nodes (never
the operator's module: see nodes.py), skyvm's public core (skyvm.api, run_ids, waiting, errors, redact,
settings, the local backend's run-arg helper).
"""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Any, Optional, Sequence

from airflow.configuration import conf
from airflow.executors.base_executor import PARALLELISM, BaseExecutor

from airflow_skyvm.nodes import node_name
from skyvm.api import NodeHandle, Run
from skyvm.errors import SkyVMError
from skyvm import redact, run_ids, waiting
from skyvm.settings import NodeSettings, SkyVMConfig, as_config

# The workload (with its token) travels as a secret env var and is written to a
# file inside the node by a shell builtin: it never appears on a command line.
WORKLOAD_ENV = "SKYVM_AIRFLOW_WORKLOAD"
COMMAND = (
    'f="/tmp/skyvm-workload-$$.json"; printf "%s" "$' + WORKLOAD_ENV + '" > "$f"; '
    'python3 -m airflow.sdk.execution_time.execute_workload --json-path "$f"; rc=$?; rm -f "$f"; exit $rc'
)


#: how long end() waits for running nodes before cancelling them, unless [skyvm] executor_end_timeout says
DEFAULT_END_TIMEOUT_S = 60.0


def end_timeout_setting() -> float:
    """``[skyvm] executor_end_timeout`` (``AIRFLOW__SKYVM__EXECUTOR_END_TIMEOUT``), checked."""
    raw = conf.get("skyvm", "executor_end_timeout", fallback=None)
    if raw is None or str(raw).strip() == "":
        return DEFAULT_END_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # NaN too
        raise SkyVMError(f"[skyvm] executor_end_timeout: expected seconds (a number >= 0, e.g. 60), got {raw!r}")
    return value


@functools.cache  # asked for every task: one metadata lookup per process, not one per task
def task_sdk_requirement() -> str:
    return f"apache-airflow-task-sdk=={importlib.metadata.version('apache-airflow-task-sdk')}"


class SkyVMExecutor(BaseExecutor):
    """Runs each queued task instance on a skyvm node with its own resources."""

    supports_ad_hoc_ti_run = True
    serve_logs = False
    is_local = False

    #: the shell command a node runs for a workload (the workload itself is in its environment)
    command = COMMAND

    def __init__(self, parallelism: int = PARALLELISM, *args: Any, end_timeout: Optional[float] = None, **kwargs: Any):
        super().__init__(parallelism, *args, **kwargs)
        self._config: Optional[SkyVMConfig] = None
        self._run: Optional[Run] = None
        # Only the nodes still running: sync() drops each as it finishes, so nothing grows with the tasks run.
        self._handles: dict[Any, NodeHandle] = {}
        self.end_timeout = end_timeout_setting() if end_timeout is None else end_timeout

    def start(self) -> None:
        settings_file = conf.get("skyvm", "settings_file", fallback=None) or None
        self._config = as_config(settings_file)
        self._run = Run(self._config, run_id=run_ids.run_id(run_ids.AIRFLOW_EXECUTOR))
        self.log.info("SkyVMExecutor started (settings: %s)", self._config.source or "built-in defaults")

    def _node_settings(self, ti) -> NodeSettings:
        executor_config = getattr(ti, "executor_config", None) or {}
        code = dict(executor_config.get("skyvm", {})) if isinstance(executor_config, dict) else {}
        base = self._config.resolve(ti.task_id, code=code)
        dags_folder = conf.get("core", "dags_folder")
        log_folder = conf.get("logging", "base_log_folder")
        envs = {
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": conf.get("core", "execution_api_server_url", fallback="") or "",
            "AIRFLOW__CORE__DAGS_FOLDER": dags_folder,
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": log_folder,
            # The worker needs no metadata DB; point it nowhere useful on purpose.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "sqlite:////tmp/skyvm-airflow-worker-unused.db",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        }
        run_args = list(base.docker_run_args)
        if base.backend == "local":
            from skyvm.backends.local import same_path_volumes

            # The DAG bundle and the task logs at the same paths as on this host.
            run_args += same_path_volumes([dags_folder, log_folder])
        return base.model_copy(
            update={
                "envs": {**envs, **base.envs},
                "requirements": sorted({*base.requirements, task_sdk_requirement()}),
                "docker_run_args": run_args,
            }
        )

    def _process_workloads(self, workload_items: Sequence[Any]) -> None:
        for workload in workload_items:
            ti = workload.ti
            key = ti.key
            self.queued_tasks.pop(key, None)
            self.running.add(key)
            try:
                settings = self._node_settings(ti)
                settings = settings.model_copy(update={"secrets": {**settings.secrets, WORKLOAD_ENV: workload.model_dump_json()}})
                node = node_name(ti)
                log = self.log
                self._handles[key] = self._run.start_command(node, settings, self.command, on_log=lambda line, k=key: log.debug("%s: %s", k.task_id, redact.redact(line)))
                self.log.info("SkyVMExecutor: %s on a %s node", key, settings.backend)
            except SkyVMError as exc:
                self.log.error("SkyVMExecutor cannot run %s: %s", key, exc)
                self.fail(key, info=str(exc))

    def sync(self) -> None:
        for key, handle in list(self._handles.items()):
            if not handle.done():
                continue
            del self._handles[key]
            exc = handle.exception()
            if exc is None:
                self.success(key)
            else:
                error = redact.redact(str(exc))
                self.log.error("SkyVMExecutor: %s failed on its node: %s\n%s", key, error, redact.redact(handle.logs()[-4000:]))
                self.fail(key, info=error)
            self._forget_workload(handle)  # after its last words are scrubbed

    @staticmethod
    def _forget_workload(handle: NodeHandle) -> None:
        # The workload (its token) was registered as a secret when the node started; a scheduler
        # that kept every task's would grow, and scan them all for every log line, forever.
        redact.forget(handle.settings.secrets.get(WORKLOAD_ENV))

    def end(self) -> None:
        """Wait for the running nodes, at most ``end_timeout`` seconds; then cancel those still
        running (their tasks fail, named in the log) and release every cluster."""
        waiting.wait_all(self._handles.values(), self.end_timeout, logger=self.log)
        self.sync()
        if self._handles:
            still = ", ".join(f"{key} (node {h.node}, cluster {h.cluster})" for key, h in self._handles.items())
            self.log.error(
                "SkyVMExecutor: %d task(s) still running %gs into end() ([skyvm] executor_end_timeout), cancelling their nodes: %s",
                len(self._handles), self.end_timeout, still,
            )
            for key in self._handles:
                self.fail(key, info=f"cancelled: still running {self.end_timeout:g}s after the executor was told to end")
        self.terminate()

    def terminate(self) -> None:
        """Stop every node now and release the clusters."""
        if self._run is not None:
            self._run.close(cancel=True)
        for handle in self._handles.values():
            self._forget_workload(handle)
        self._handles.clear()

"""``SkyVMOperator``: run a Python callable or a shell command on a skyvm node.

    SkyVMOperator(
        task_id="train",
        python_callable=train, op_kwargs={"epochs": 3},
        sky_settings={"cpus": 4, "memory": 16, "accelerators": "T4"},
    )

Settings come from the shared settings YAML (``settings_file``, else the
``skyvm`` connection, else ``$SKYVM_CONFIG`` / ``./skyvm.yaml``), keyed by
task_id, with ``profile`` and ``sky_settings`` above it. The argument is not
called ``resources``: that is BaseOperator's own.

Holds ``SkyVMOperator``. May import: airflow's operator base, airflow_skyvm's exceptions, masking, hooks,
nodes, summary and (lazily, to defer) triggers, skyvm's public core (skyvm.api, run_ids, node's payloads,
errors, redact, settings, costs, backends.base's states).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
import time
from types import SimpleNamespace
from typing import Any, Optional

from airflow_skyvm.exceptions import SkyVMInfrastructureException, SkyVMNodeFailedException, SkyVMNodeSkippedException, exit_codes, node_exit_code
from airflow_skyvm import masking
from airflow_skyvm.hooks.skyvm import SkyVMHook
from airflow_skyvm.nodes import node_name
from airflow_skyvm.summary import report
from skyvm import run_ids
from skyvm.api import NodeHandle, Run, teardown
from skyvm.backends.base import JobState
from skyvm.costs import node_row
from skyvm.errors import InfrastructureError, NodeFailed
from skyvm.node import make_call_payload, make_command_payload
from skyvm.redact import redact
from skyvm.settings import NodeSettings, validate_layer

try:  # Airflow 3
    from airflow.sdk import BaseOperator
except ImportError:  # pragma: no cover
    from airflow.models import BaseOperator


# Airflow logs through structlog, which skyvm.redact does not see: its own masker learns our secrets too.
masking.install()


def _status_of(event: Mapping[str, Any]) -> Any:
    """The node's final status as the trigger saw it, or None (an event without one: ask the node)."""
    try:
        state = JobState(event["status"])
    except (KeyError, ValueError):
        return None
    return SimpleNamespace(state=state, exit_code=event.get("exit_code"), detail=event.get("detail") or "")


def _has_template(value: Any) -> bool:
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, Mapping):
        return any(_has_template(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_template(v) for v in value)
    return False


class SkyVMOperator(BaseOperator):
    """Run ``python_callable(*op_args, **op_kwargs)`` or ``bash_command`` in its own container on a VM.

    :param python_callable: the function to run on the node (its return value is the XCom ``return_value``)
    :param op_args: positional arguments for it (templated)
    :param op_kwargs: keyword arguments for it (templated)
    :param bash_command: a shell command instead; the last line it prints is the XCom (templated)
    :param image: the image to run in (must contain skyvm); default: skyvm's node image (templated)
    :param sky_settings: node settings for this task, above the settings file's (templated)
    :param profile: a profile of the settings file
    :param settings_file: the shared settings YAML; default: the connection's, then $SKYVM_CONFIG / ./skyvm.yaml
    :param skyvm_conn_id: a ``skyvm`` connection holding the settings and registry credentials
    :param deferrable: launch, then wait in the triggerer, holding no worker slot
    :param poll_interval: seconds between checks while deferred
    :param skip_on_exit_code: exit codes (one, or a list) that skip the task instead of failing it,
        as in ``@task.docker`` and ``@task.virtualenv``: a command's exit code, or ``n`` of
        ``sys.exit(n)`` in the callable (a listed 0 skips a task that succeeded)

    A failed node raises ``SkyVMNodeFailedException`` (an ``AirflowException`` and a
    ``skyvm.errors.NodeFailed``) carrying the remote traceback, exit code and log lines.
    ``sys.exit(0)`` (or ``sys.exit()``) in the callable ends it successfully, returning None,
    as it would end a process.
    """

    template_fields: Sequence[str] = ("bash_command", "op_args", "op_kwargs", "image", "sky_settings")
    template_fields_renderers = {"bash_command": "bash", "op_args": "py", "op_kwargs": "py", "sky_settings": "json"}
    ui_color = "#cfe8fc"

    def __init__(
        self,
        *,
        python_callable: Optional[Callable] = None,
        op_args: Optional[Collection[Any]] = None,
        op_kwargs: Optional[Mapping[str, Any]] = None,
        bash_command: Optional[str] = None,
        image: Optional[str] = None,
        sky_settings: Optional[Mapping[str, Any]] = None,
        profile: Optional[str] = None,
        settings_file: Optional[str] = None,
        skyvm_conn_id: Optional[str] = SkyVMHook.default_conn_name,
        deferrable: bool = False,
        poll_interval: float = 2.0,
        skip_on_exit_code: Optional[int | Collection[int]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (python_callable is None) == (bash_command is None):
            raise ValueError(f"SkyVMOperator {self.task_id!r}: give exactly one of python_callable or bash_command")
        if python_callable is not None and not callable(python_callable):
            raise TypeError(f"SkyVMOperator {self.task_id!r}: python_callable must be callable, got {type(python_callable).__name__}")
        self.python_callable = python_callable
        self.op_args = list(op_args or [])
        self.op_kwargs = dict(op_kwargs or {})
        self.bash_command = bash_command
        self.image = image
        self.sky_settings = dict(sky_settings or {})
        self.profile = profile
        self.settings_file = settings_file
        self.skyvm_conn_id = skyvm_conn_id
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.skip_on_exit_code = exit_codes(skip_on_exit_code, f"task {self.task_id!r}")
        if not _has_template(self.sky_settings):
            # A typo fails when the DAG file is parsed, not when the task runs.
            validate_layer(self.sky_settings, "sky_settings", f"task {self.task_id!r}")
        self._node: Any = None

    # -- settings ------------------------------------------------------------

    def node_settings(self) -> tuple[Any, NodeSettings]:
        config = SkyVMHook(self.skyvm_conn_id, self.settings_file).get_config()
        code = dict(self.sky_settings)
        if self.image:
            code["image"] = self.image
        return config, config.resolve(self.task_id, profile=self.profile, code=code)

    def _run_id(self, context) -> str:
        ti = context["ti"]
        return run_ids.run_id(run_ids.AIRFLOW_TASK, ti.dag_id, ti.run_id, node_name(ti))

    def _payload(self) -> bytes:
        if self.bash_command is not None:
            return make_command_payload(self.bash_command)
        return make_call_payload(self.python_callable, self.op_args, self.op_kwargs, node=self.task_id)

    # -- the two paths -----------------------------------------------------------

    def execute(self, context) -> Any:
        config, settings = self.node_settings()
        run = Run(config, run_id=self._run_id(context), log_summary=False)  # report() logs it, at the end
        self.log.info("skyvm: %s on a %s node: %s", self.task_id, settings.backend, settings.public_dump())
        if self.deferrable:
            from airflow_skyvm.triggers.skyvm import SkyVMTrigger

            # Launched as every node is; this process then lets go of it (no cancel): the trigger follows
            # it from its reference, which holds no secret (Airflow stores it), and when it started
            # (the summary's duration: the handle execute_complete finds again did not see it start).
            launched = run.start_raw(self.task_id, settings, self._payload())
            node = {**launched.let_go(), "started_at": launched.started_at}
            self.log.info("skyvm: launched on %s; deferring", node["cluster"])
            self.defer(
                trigger=SkyVMTrigger(node=node, poll_interval=self.poll_interval),
                method_name="execute_complete",
                timeout=self.execution_timeout,
            )
        self._node = run  # until the node starts, on_kill tears down the run
        try:
            handle = run.start_raw(self.task_id, settings, self._payload(), on_log=lambda line: self.log.info("%s", redact(line)))
            self._node = handle
            value = self._settle(handle.result, lambda: handle.logs().splitlines())
            self.log.info("skyvm: %s finished on %s in %.1fs", self.task_id, handle.cluster, handle.duration_s or 0)
            return value
        finally:
            try:
                teardown(run)  # the run holds the node: stops it if still running, releases its cluster
            finally:
                self._node = None
                report(self, context, run.cost_summary())
                masking.flush()  # secrets read on skyvm's threads: masked in the task log before Airflow logs the outcome

    def execute_complete(self, context, event: dict) -> Any:
        """Back from the trigger: log what it did not, fetch the result, release the cluster.

        An ``error`` event (the node is gone, or waiting on it failed) fails the task with the
        trigger's message, which names the node and the fix.
        """
        node = NodeHandle.attach(event["node"])
        self._node = node  # until the cluster is released, on_kill tears it down
        try:
            if event.get("status") == "error":
                raise SkyVMInfrastructureException(event.get("message") or f"skyvm: waiting on node {node.node!r} on cluster {node.cluster} failed")
            if event.get("unanswered_checks"):
                self.log.info("skyvm: while deferred, node %r's cluster did not answer %d status checks (retried)", node.node, event["unanswered_checks"])
            # The trigger streamed the log up to log_offset into this task's log already.
            text, _ = node.read_log(int(event.get("log_offset") or 0))
            for line in text.splitlines():
                self.log.info("%s", redact(line))
            return self._settle(node.outcome(_status_of(event)).value, lambda: node.read_log(0)[0].splitlines())
        finally:
            self._node = None
            try:
                teardown(node)
            except Exception:  # noqa: BLE001 - the task's own error (or result) matters more
                self.log.exception("skyvm: releasing cluster %s of node %r failed", node.cluster, node.node)
            # The node ran from its launch in execute until the trigger saw it end (or until now).
            report(self, context, [node_row(node, started_at=event["node"].get("started_at"), finished_at=event.get("finished_at") or time.time())])
            masking.flush()

    def _settle(self, value: Callable[[], Any], logs: Callable[[], list[str]]) -> Any:
        """The node's value, or Airflow's exception for how it ended (``value`` raises NodeFailed when the node failed)."""

        def lines() -> list[str]:
            try:
                return logs()
            except Exception as exc:  # noqa: BLE001 - the node's outcome matters more than its log
                self.log.warning("skyvm: reading the log of node %r failed: %s", self.task_id, exc)
                return []

        try:
            result = value()
            code = 0
        except NodeFailed as exc:
            code = node_exit_code(exc)
            if code != 0 and code not in self.skip_on_exit_code:
                raise SkyVMNodeFailedException.from_node_failed(exc, lines()) from None
            result = None  # sys.exit(0) ends the callable as it would end a process: successfully
        except SkyVMInfrastructureException:
            raise
        except InfrastructureError as exc:  # the node could not run: Airflow's convention is an AirflowException
            raise SkyVMInfrastructureException(str(exc)) from exc
        if code in self.skip_on_exit_code:
            raise SkyVMNodeSkippedException(
                f"skyvm: node {self.task_id!r} exited with code {code}, listed in skip_on_exit_code {list(self.skip_on_exit_code)}: skipping the task",
                exit_code=code,
                logs=lines(),
            )
        return result

    def on_kill(self) -> None:
        """Killed, marked failed or timed out: stop the node and release its cluster (the same teardown as success)."""
        if self._node is not None:
            self.log.info("skyvm: stopping node of %s", self.task_id)
            teardown(self._node)
            self._node = None

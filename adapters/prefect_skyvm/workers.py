"""``SkyVMWorker``: each flow run of a ``skyvm`` work pool runs on its own skyvm node.

    prefect work-pool create my-pool --type skyvm
    prefect worker start --pool my-pool --type skyvm

The work pool's variables are node settings (cpus, memory, accelerators, ...);
a deployment's ``job_variables`` set them per deployment, above the shared
settings YAML's ``defaults``, profile and ``nodes[<flow name>]``. On the node,
Prefect's own engine runs the flow run (``python -m prefect.engine``), so
states, logs and results go to the Prefect API from there: the node must reach
it (the local backend shares the host's network; a cloud VM needs an address it
can reach). The API URL and key travel as secrets. The worker follows the node:
a flow run cancelled in the UI or the API stops its node and releases its
cluster; a node that cannot start or dies leaves the run Crashed with the reason.

Holds ``SkyVMWorker``, its variables and job configuration. May import: prefect, anyio,
prefect_skyvm.flow_node, .context and .bundle, skyvm's public core (skyvm.api, run_ids, waiting, backends.base's
NodeRef and states, errors, redact, settings).
"""

from __future__ import annotations

import json
import sys
import uuid
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import anyio
import anyio.abc
from pydantic import Field, PrivateAttr
from prefect.client.schemas.objects import Flow as APIFlow
from prefect.exceptions import InfrastructureNotFound
from prefect.states import Crashed, Failed, Pending
from prefect.utilities.engine import propose_state
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult

from prefect_skyvm import flow_node
from prefect_skyvm.context import describe
from skyvm import run_ids, waiting
from skyvm.api import NodeHandle, Run, backend_for, node_image
from skyvm.backends.base import EXIT_CANCELLED, JobState, NodeRef
from skyvm.errors import InfrastructureError, NodeCancelled, NodeFailed, SettingsError
from skyvm.pool import pool_of
from skyvm.redact import redact
from skyvm.settings import NodeSettings

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse
    from prefect.flows import Flow

Quantity = Optional[Union[float, str]]

# How often the worker looks for a cancel of a flow run whose node runs (Prefect's own cancel
# observer only handles runs that have not started).
CANCEL_POLL_S = 1.0


def _node_fields() -> dict[str, Any]:
    """The node settings as work-pool variables: one definition, used by both the variables
    (the pool's form and schema) and the job configuration (what the worker reads)."""
    return {
        "settings_file": (Optional[str], Field(default=None, title="Settings file", description="The shared skyvm settings YAML on the worker's host (default: $SKYVM_CONFIG, ./skyvm.yaml)")),
        "profile": (Optional[str], Field(default=None, description="A profile of the settings file for the flow's node")),
        "backend": (Optional[str], Field(default=None, description="local (Docker on the worker's host) or skypilot")),
        "cpus": (Quantity, Field(default=None, title="CPUs", description="CPUs of the node: 2, or '2+' for at least 2")),
        "memory": (Quantity, Field(default=None, description="Memory of the node in GiB: 8, or '8+'")),
        "accelerators": (Optional[Union[str, dict[str, float]]], Field(default=None, description="'A100', 'A100:2' or {A100: 2}")),
        "use_spot": (Optional[bool], Field(default=None, title="Use spot", description="Run on a spot VM")),
        "job_recovery": (Optional[Union[str, dict[str, Any]]], Field(default=None, description="A managed job's recovery: FAILOVER, EAGER_NEXT_REGION or a mapping")),
        "cloud": (Optional[str], Field(default=None, description="aws, gcp, azure, lambda or kubernetes")),
        "infra": (Optional[str], Field(default=None, description="CLOUD[/REGION[/ZONE]] or k8s/CONTEXT")),
        "region": (Optional[str], Field(default=None)),
        "zone": (Optional[str], Field(default=None)),
        "instance_type": (Optional[str], Field(default=None)),
        "disk_size": (Optional[int], Field(default=None, description="Disk size in GB")),
        "disk_tier": (Optional[str], Field(default=None, description="low, medium, high, ultra or best")),
        "image": (Optional[str], Field(default=None, description="A container image with skyvm and Prefect (default: skyvm's node image with Prefect)")),
        "requirements": (Optional[list[str]], Field(default=None, description="Packages built into the node image")),
        "registry": (Optional[dict[str, Any]], Field(default=None, description="The registry the node image is pushed to and pulled from")),
        "envs": (Optional[dict[str, str]], Field(default=None, title="Node environment", description="Environment variables of the node")),
        "secrets": (Optional[dict[str, str]], Field(default=None, description="Secret references (env:NAME, file:PATH, prefect:secret/NAME) given to the node masked")),
        "docker_run_args": (Optional[list[str]], Field(default=None, description="Extra docker run arguments of the node's container")),
        "down": (Optional[bool], Field(default=None, description="Tear the cluster down when the flow run ends (default true)")),
        "idle_minutes_to_autostop": (Optional[int], Field(default=None, description="Stop the cluster after this many idle minutes")),
        "timeout": (Optional[float], Field(default=None, description="Seconds the node may run before it is cancelled")),
        "payload_store": (Optional[str], Field(default=None, description="Where payloads travel: a directory, s3://, gs:// or az://")),
        "connector": (Optional[Union[str, list[str]]], Field(default=None, description="Connectors (by name, from the settings file) the node uses")),
        "stream_output": (bool, Field(default=True, description="Print the node's output in the worker's output")),
    }


def _with_fields(name: str, base: type, fields: dict[str, Any]) -> type:
    from pydantic import create_model

    return create_model(name, __base__=base, **fields)


_SkyVMVariablesBase = _with_fields("_SkyVMVariablesBase", BaseVariables, _node_fields())
_SkyVMJobConfigurationBase = _with_fields("_SkyVMJobConfigurationBase", BaseJobConfiguration, _node_fields())


class SkyVMVariables(_SkyVMVariablesBase):
    """A skyvm work pool's variables: the flow's node settings."""


class SkyVMJobConfiguration(_SkyVMJobConfigurationBase):
    """One flow run's configuration: the pool's defaults, the deployment's and the run's job variables."""

    _flow_name: Optional[str] = PrivateAttr(default=None)
    _source_dirs: list[str] = PrivateAttr(default_factory=list)

    def prepare_for_flow_run(
        self,
        flow_run: "FlowRun",
        deployment: "DeploymentResponse | None" = None,
        flow: "APIFlow | None" = None,
        work_pool: "WorkPool | None" = None,
        worker_name: str | None = None,
        worker_id: "uuid.UUID | None" = None,
    ) -> None:
        super().prepare_for_flow_run(flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id)
        self._flow_name = flow.name if flow is not None else flow_run.name
        self._source_dirs = flow_node.source_directories(deployment)

    @staticmethod
    def _base_flow_run_command() -> str:
        return flow_node.ENGINE_COMMAND

    def base_settings(self, flow_name: str, where: str) -> NodeSettings:
        """The node settings the job variables and the settings file give the flow."""
        variables = {name: getattr(self, name) for name in (*flow_node.NODE_FIELDS, *flow_node.SELECT_FIELDS)}
        return flow_node.flow_settings(flow_name, variables, where)

    def node_settings(self, flow_run: "FlowRun") -> NodeSettings:
        """The node's settings with what the flow run needs added: its environment (the API URL and key as
        secrets), Prefect in the image, and on the local backend the flow's code and result storage mounted."""
        base = self.base_settings(self._flow_name or flow_run.name, f"flow run {flow_run.name!r} of flow {self._flow_name!r}")
        envs, secrets = flow_node.split_env(self.env)
        update: dict[str, Any] = {"envs": {**envs, **base.envs}, "secrets": {**secrets, **base.secrets}}
        if not base.image:
            update["requirements"] = sorted({*base.requirements, *flow_node.node_requirements()})
        if base.backend == "local":
            args, mount_envs = flow_node.local_mounts(self._source_dirs, _local_result_dir())
            update["docker_run_args"] = [*base.docker_run_args, *args]
            update["envs"] = {**update["envs"], **mount_envs}
        return base.model_copy(update=update)


def _local_result_dir() -> Optional[str]:
    """Prefect's local result storage on this host (PREFECT_LOCAL_STORAGE_PATH), mounted on a local node
    at the same path so a result the node writes is read here."""
    from prefect.settings import get_current_settings

    path = get_current_settings().results.local_storage_path
    return str(path.expanduser().resolve()) if path else None


class SkyVMWorkerResult(BaseWorkerResult):
    """The end of one flow run's node."""


class _Node:
    """A flow run's node as the worker follows it."""

    def __init__(self, run: Run, handle: NodeHandle):
        self.run = run
        self.handle = handle


class SkyVMWorker(BaseWorker[SkyVMJobConfiguration, SkyVMVariables, SkyVMWorkerResult]):
    """Runs each flow run on its own skyvm node (a container on the local backend, a VM through SkyPilot)."""

    type = "skyvm"
    job_configuration = SkyVMJobConfiguration
    job_configuration_variables = SkyVMVariables
    _description = "Run each flow run on its own skyvm node: a container locally, or a cloud VM through SkyPilot, with per-deployment resources."
    _display_name = "skyvm"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._nodes: dict[str, _Node] = {}

    # -- deployments: the engine on the node ------------------------------------------

    async def run(
        self,
        flow_run: "FlowRun",
        configuration: SkyVMJobConfiguration,
        task_status: Optional[anyio.abc.TaskStatus[str]] = None,
    ) -> SkyVMWorkerResult:
        command = configuration.command or flow_node.ENGINE_COMMAND
        return await self._run_on_node(flow_run, configuration, task_status, lambda run, node, s: run.start_command(node, s, command, on_log=self._printer(configuration)))

    # -- @skyvm and worker.submit: the flow travels as Prefect's bundle ------------------

    async def _submit_adhoc_run(
        self,
        flow: "Flow[..., Any]",
        parameters: dict[str, Any] | None = None,
        job_variables: dict[str, Any] | None = None,
        task_status: anyio.abc.TaskStatus["FlowRun"] | None = None,
        flow_run: "FlowRun | None" = None,
    ) -> None:
        from prefect.bundles import create_bundle_for_flow_run
        from prefect.context import FlowRunContext, TagsContext
        from prefect.tasks import Task

        job_variables = dict(job_variables or {})
        configuration = await self.job_configuration.from_template_and_values(
            base_job_template=self.work_pool.base_job_template, values=job_variables, client=self.client
        )
        # The node's settings are checked before the flow run exists: a bad value raises here, nothing starts.
        settings = configuration.base_settings(flow.name, f"@skyvm flow {flow.name!r}")
        if settings.backend == "local" and flow.persist_result is None:
            # Results go to the local result storage, which a local node mounts: the caller reads them back.
            flow = flow.with_options(persist_result=True)
        if flow_run is None:
            parent_task_run = None
            if flow_run_ctx := FlowRunContext.get():
                # A child flow run shows as one in the UI, as Prefect's own workers do it.
                parent_task_run = await Task(name=flow.name, fn=flow.fn, version=flow.version).create_run(
                    flow_run_context=flow_run_ctx, parameters=parameters or {}
                )
            flow_run = await self.client.create_flow_run(
                flow,
                parameters=flow.serialize_parameters(parameters or {}),
                state=Pending(),
                job_variables=job_variables,
                work_pool_name=self.work_pool.name,
                tags=TagsContext.get().current_tags,
                parent_task_run_id=getattr(parent_task_run, "id", None),
            )
        else:
            await self.client.set_flow_run_state(flow_run.id, Pending(message="Retrying on a skyvm node"), force=True)
            flow_run = await self.client.read_flow_run(flow_run.id)
        if task_status is not None:
            task_status.started(flow_run)
        configuration.prepare_for_flow_run(
            flow_run=flow_run, flow=APIFlow(id=flow_run.flow_id, name=flow.name, labels={}), work_pool=self.work_pool, worker_name=self.name, worker_id=self.backend_id
        )
        try:
            bundle = create_bundle_for_flow_run(flow=flow, flow_run=flow_run)["bundle"]
        except Exception as exc:  # noqa: BLE001 - reported on the flow run, as Prefect's workers do
            await self._propose_crashed_state(flow_run, f"Flow run bundle could not be created: {type(exc).__name__}: {exc}")
            return
        # The node image holds the packages: nothing is installed on the node (it may have no index to reach).
        bundle = {**bundle, "dependencies": ""}
        from prefect_skyvm.bundle import run_bundle

        try:
            await self._run_on_node(flow_run, configuration, None, lambda run, node, s: run.start_call(node, s, run_bundle, (bundle,), on_log=self._printer(configuration)))
        except Exception as exc:  # noqa: BLE001 - the flow run says why; the caller's future sees it
            await self._propose_crashed_state(flow_run, f"Failed to submit flow run to a skyvm node: {type(exc).__name__}: {exc}")

    # -- the node's life ----------------------------------------------------------------

    def _printer(self, configuration: SkyVMJobConfiguration) -> Optional[Callable[[str], None]]:
        if not configuration.stream_output:
            return None
        return lambda line: print(redact(line), file=sys.stdout, flush=True)

    async def _run_on_node(self, flow_run: "FlowRun", configuration: SkyVMJobConfiguration, task_status, start) -> SkyVMWorkerResult:
        logger = self.get_flow_run_logger(flow_run)
        try:
            settings = configuration.node_settings(flow_run)
        except SettingsError as exc:
            # The user's mistake, not the infrastructure's: the run fails, naming the field; nothing starts.
            await self._propose_state(flow_run, Failed(message=f"skyvm: bad job variables, nothing was launched: {exc}"))
            raise
        node = configuration._flow_name or flow_run.name
        run = Run({}, run_id=run_ids.run_id(run_ids.PREFECT_FLOW, flow_run.id))
        try:
            if settings.backend == "local" and not settings.image:
                # Built (or found) now, so the flow's own task nodes can run in the same image.
                image = await anyio.to_thread.run_sync(node_image, settings)
                settings = settings.model_copy(update={"envs": {**settings.envs, "SKYVM_NODE_IMAGE": image}})
            logger.info("skyvm: flow run %s on a %s node (%s)", flow_run.name, settings.backend, describe(settings))
            handle: NodeHandle = start(run, node, settings)
            # The node is submitted once it has a reference (or it ended before getting one).
            while handle.ref is None and not await waiting.wait_async(handle, CANCEL_POLL_S / 10):
                pass
            if handle.ref is None:
                raise handle.exception() or InfrastructureError(f"node {node!r} ended before it started")
            pid = json.dumps(handle.ref.to_dict(), separators=(",", ":"))
            self._nodes[pid] = _Node(run, handle)
            if task_status is not None:
                task_status.started(pid)
            cancelled = await self._follow(flow_run, handle)
            return SkyVMWorkerResult(identifier=pid, status_code=await self._outcome(flow_run, handle, cancelled))
        finally:
            # Also when the worker stops (its task group cancelled): the node is stopped and its cluster released.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: run.close(cancel=True))
                if settings.backend == "local":
                    left = await anyio.to_thread.run_sync(flow_node.remove_task_clusters, flow_run.id)
                    if left:
                        logger.info("skyvm: removed the clusters the flow's own task nodes left: %s", ", ".join(left))
            for pid, held in list(self._nodes.items()):
                if held.run is run:
                    del self._nodes[pid]

    async def _follow(self, flow_run: "FlowRun", handle: NodeHandle) -> bool:
        """Wait for the node, stopping it when the flow run is cancelled. True when it was."""
        while not await waiting.wait_async(handle, CANCEL_POLL_S):
            try:
                state = (await self.client.read_flow_run(flow_run.id)).state
            except Exception as exc:  # noqa: BLE001 - the API may blip; the node runs on
                self._logger.debug("reading flow run %s: %s", flow_run.id, exc)
                continue
            if state is not None and state.is_cancelling():
                await anyio.to_thread.run_sync(handle.cancel)
                await self._mark_flow_run_as_cancelled(
                    await self.client.read_flow_run(flow_run.id), {"message": "Flow run cancelled: its skyvm node was stopped and its cluster released."}
                )
                return True
        return False

    async def _outcome(self, flow_run: "FlowRun", handle: NodeHandle, cancelled: bool) -> int:
        exc = handle.exception()
        if exc is None or cancelled:
            return 0
        code = exc.returncode if isinstance(exc, NodeFailed) and exc.returncode else 1
        # The engine reports the flow's own failure itself; a node that died or could not run leaves the
        # run Crashed with the reason (a proposal after a final state is refused, so it only fills a gap).
        reason = str(exc).split("\n\nRemote traceback:")[0]
        if isinstance(exc, NodeCancelled):
            code = EXIT_CANCELLED
            reason = f"{reason} from outside this worker (kill_infrastructure in another process, or skyvm gc)"
        tail = "\n".join(handle.logs().splitlines()[-20:])
        await self._propose_state(flow_run, Crashed(message=f"skyvm node of flow run {flow_run.name!r} ended without a final state: {reason}\n{tail}".strip()))
        return code

    async def _propose_state(self, flow_run: "FlowRun", state) -> None:
        from prefect.exceptions import Abort

        try:
            await propose_state(self.client, state, flow_run_id=flow_run.id)
        except Abort:
            pass  # already final: the engine on the node reported it

    # -- cancel ----------------------------------------------------------------------------

    async def kill_infrastructure(self, infrastructure_pid: str, configuration: SkyVMJobConfiguration, grace_seconds: int = 30) -> None:
        """Stop a flow run's node and release its cluster (Prefect calls this for a cancelled run that has
        not started, and to tear down after a cancel that timed out)."""
        held = self._nodes.get(infrastructure_pid)
        if held is not None:
            await anyio.to_thread.run_sync(lambda: held.handle.cancel(wait_s=max(grace_seconds, 1)))
            await anyio.to_thread.run_sync(lambda: held.run.close(cancel=True))
            return
        # A node another worker process started: found again from its reference.
        try:
            ref = NodeRef.from_dict(json.loads(infrastructure_pid))
        except (ValueError, TypeError) as exc:
            raise InfrastructureNotFound(f"{infrastructure_pid!r} is not a skyvm node reference: {exc}") from None
        settings = configuration.base_settings(ref.node, f"node {ref.node!r}")
        # The backend that launched the node (its reference says which; "local-process" is the local one),
        # with the node's own settings: never a copy whose backend field was overwritten with a backend's name.
        backend = backend_for(settings, ref.backend)

        def stop() -> None:
            if backend.status(ref).state is JobState.GONE:
                raise InfrastructureNotFound(f"skyvm node {ref.node!r} on {ref.cluster} no longer exists")
            backend.cancel(ref)
            pool = pool_of(backend)
            pool.release(ref, True, discard=True)
            pool.end_run(ref.run_id)

        await anyio.to_thread.run_sync(stop)

"""``@skyvm``: calling a flow runs it on a skyvm node, through a work pool of type ``skyvm``.

    from prefect import flow
    from prefect_skyvm import skyvm

    @skyvm(work_pool="my-pool", cpus=2, memory=4)
    @flow
    def train(rows: int) -> float:
        ...

    train(10_000)          # runs on a node, returns the flow's result
    train.submit(10_000)   # a PrefectFlowRunFuture

As prefect-docker's ``@docker``: the call starts a ``SkyVMWorker`` in this
process, which creates the flow run, ships the flow as Prefect's bundle and
follows its node. The pool is created (type ``skyvm``) when it does not exist.

Holds ``skyvm``. May import: prefect, prefect_skyvm.flow_node and .workers, skyvm.settings.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from prefect.flows import Flow, InfrastructureBoundFlow, bind_flow_to_infrastructure

from prefect_skyvm import flow_node
from prefect_skyvm.workers import SkyVMJobConfiguration, SkyVMWorker
from skyvm.settings import validate_layer

F = TypeVar("F", bound=Flow)


def skyvm(work_pool: str, **job_variables: Any) -> Callable[[Flow], InfrastructureBoundFlow]:
    """Bind a flow to a ``skyvm`` work pool; ``job_variables`` are the node's settings
    (``cpus``, ``memory``, ``accelerators``, ``profile``, ``settings_file``, ...), above the pool's.

    A job variable the worker does not know raises ValueError, a bad value SettingsError, here, naming
    the field, the value and what is accepted; the settings file's layers are applied when the flow is
    called, before a flow run is created.
    """
    accepted = set(SkyVMJobConfiguration.model_fields)
    unknown = sorted(set(job_variables) - accepted)
    if unknown:
        raise ValueError(
            f"@skyvm(work_pool={work_pool!r}): unknown job variable(s) {unknown}; accepted: "
            f"{', '.join((*flow_node.SELECT_FIELDS, *flow_node.NODE_FIELDS, 'env', 'stream_output'))}"
        )
    validate_layer({k: v for k, v in job_variables.items() if k in flow_node.NODE_FIELDS}, "job_variables", f"@skyvm(work_pool={work_pool!r})")

    def bind(flow: Flow) -> InfrastructureBoundFlow:
        if not isinstance(flow, Flow):
            raise TypeError(f"@skyvm decorates a Prefect flow (put it above @flow); got {type(flow).__name__}")
        return bind_flow_to_infrastructure(flow, work_pool, SkyVMWorker, job_variables=job_variables)

    return bind

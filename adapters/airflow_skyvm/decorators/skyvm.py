"""``@task.skyvm``: a TaskFlow function that runs on a skyvm node, like ``@task.docker``.

    @task.skyvm(profile="gpu", cpus=4)
    def train(rows: int) -> float: ...

Node settings (any NodeSettings field: cpus, memory, accelerators, ...) may be
given directly; the operator's own arguments (image, sky_settings, profile,
settings_file, skyvm_conn_id, deferrable, skip_on_exit_code) too.

As with ``@task.docker``: a failed node raises ``SkyVMNodeFailedException`` (an
``AirflowException``) with the remote traceback, and ``sys.exit(n)`` with ``n`` in
``skip_on_exit_code`` skips the task.

Holds ``skyvm_task``. May import: airflow's decorator base, airflow_skyvm.operators, skyvm.settings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from airflow_skyvm.operators.skyvm import SkyVMOperator
from skyvm.settings import NodeSettings

try:  # Airflow 3
    from airflow.sdk.bases.decorator import DecoratedOperator, task_decorator_factory
except ImportError:  # pragma: no cover
    from airflow.decorators.base import DecoratedOperator, task_decorator_factory


class _SkyVMDecoratedOperator(DecoratedOperator, SkyVMOperator):
    custom_operator_name = "@task.skyvm"
    template_fields = (*DecoratedOperator.template_fields, "image", "sky_settings")

    def __init__(self, *, python_callable: Callable, op_args=None, op_kwargs=None, **kwargs: Any) -> None:
        node_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in NodeSettings.model_fields and k != "image"}
        kwargs["sky_settings"] = {**(kwargs.get("sky_settings") or {}), **node_fields}
        super().__init__(
            kwargs_to_upstream={"python_callable": python_callable, "op_args": op_args, "op_kwargs": op_kwargs},
            python_callable=python_callable,
            op_args=op_args,
            op_kwargs=op_kwargs,
            **kwargs,
        )


def skyvm_task(python_callable: Optional[Callable] = None, multiple_outputs: Optional[bool] = None, **kwargs: Any):
    """Wrap a function into a SkyVMOperator task (``@task.skyvm``)."""
    return task_decorator_factory(
        python_callable=python_callable,
        multiple_outputs=multiple_outputs,
        decorated_operator_class=_SkyVMDecoratedOperator,
        **kwargs,
    )

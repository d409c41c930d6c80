"""What runs on a node for ``@skyvm`` and ``worker.submit``: Prefect's own bundle execution.

The flow travels as Prefect's bundle (the flow pickled with the modules of your
project by value, the flow run, the context), inside skyvm's call payload.

Holds ``run_bundle``. May import: prefect only (it runs on the node, where skyvm's host parts are not needed).
"""

from __future__ import annotations

from typing import Any


def run_bundle(bundle: dict[str, Any]) -> None:
    """Run the flow run the bundle holds, as Prefect's ``python -m prefect.bundles.execute`` does:
    in a subprocess it supervises, which a cancel of the flow run stops. States, logs and results go
    to the Prefect API named by PREFECT_API_URL in the node's environment."""
    from prefect.bundles.execute import execute_bundle
    from prefect.utilities.asyncutils import run_coro_as_sync

    run_coro_as_sync(execute_bundle(bundle))

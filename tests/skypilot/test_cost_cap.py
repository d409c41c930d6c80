"""The cost cap at launch: a node whose cheapest feasible placement costs more than its
max_hourly_cost is refused before anything is provisioned, with the same words as ``skyvm plan``.

The backend's SkyPilot process is a real one (SkyPilot's optimizer on the repo's catalogs); the
refusal comes before ``sky.launch``, so no cloud is asked for anything.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

pytest.importorskip("sky")

from skyvm import InfrastructureError  # noqa: E402
from skyvm.backends.skypilot import SkyPilotBackend  # noqa: E402
from skyvm.plan import plan_node  # noqa: E402
from skyvm.pool import pool_of  # noqa: E402
from skyvm.settings import NodeSettings  # noqa: E402
from skyvm.skypilot.bridge import SubprocessBridge  # noqa: E402


@pytest.fixture
def optimizer_bridge(catalog_dir, tmp_path):
    runtime = tmp_path / "sky-runtime"
    shutil.copytree(catalog_dir, runtime / ".sky" / "catalogs" / "v8", ignore=shutil.ignore_patterns("*.md"))
    bridge = SubprocessBridge(sys.executable, env={**os.environ, "SKY_RUNTIME_DIR": str(runtime), "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"})
    yield bridge
    bridge.close()


def spec(settings: NodeSettings, node: str):
    return plan_node(
        settings, node=node, run_id="manual__cap", attempt_id=f"{node}-1", payload_url="s3://bucket/payloads/x",
        result_url=f"s3://bucket/results/{node}-1", image="registry.example.com/skyvm-node:abc",
    )


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"cloud": "aws", "cpus": "4+", "memory": "16+"}, "m7i.xlarge on aws/us-east-1, costs $0.2016/hour"),
        ({"any_of": [{"infra": "lambda", "accelerators": "H100:8"}, {"infra": "gcp", "accelerators": "A100:1"}], "max_hourly_cost": 1}, "a2-highgpu-1g on gcp/europe-west4/europe-west4-a, costs $2.4277/hour"),
    ],
)
def test_every_launch_refuses_a_node_over_its_cap_naming_the_cheapest_placement(optimizer_bridge, fields, message):
    backend = SkyPilotBackend(optimizer_bridge)
    settings = NodeSettings(backend="skypilot", **{"max_hourly_cost": 0.1, **fields})
    for node in ("first", "second"):  # the second node of the signature is refused from the first's answer
        with pytest.raises(InfrastructureError) as excinfo:
            pool_of(backend).launch(spec(settings, node))
        cap = f"{settings.max_hourly_cost:g}"
        assert str(excinfo.value).startswith(f"node {node!r}: max_hourly_cost ${cap}/hour: the cheapest feasible placement, {message}")
    assert pool_of(backend).names() == set()  # refused before a cluster was taken, let alone launched

"""airflow: a DAG of N tasks with SkyVMOperator against the Docker provider's DockerOperator.

Both through ``dag.test()`` against a real metadata DB (a throwaway ``AIRFLOW_HOME``, ``airflow
db migrate`` on SQLite, as tests/airflow/conftest.py does), on the same image (skyvm's node
image, built through skyvm first, not timed), N independent tasks each:

- SkyVMOperator cold: ``python_callable=square, op_args=[i]`` with ``down: true`` (a container
  per task, started, set up and removed);
- SkyVMOperator warm: the same with ``down: false``: every task execs on the warm cluster a
  first (uncounted) DAG run left;
- DockerOperator: ``python3 -c 'print(i*i)'`` in a container of the image (host network,
  removed after).

Every task must succeed and its XCom be i*i. Wall time of ``dag.test()``, alternately.
Targets (issue): SkyVMOperator at most 1.0x DockerOperator; at most 0.5x with warm reuse.

Needs ``apache-airflow-providers-docker`` in the Airflow environment; it is not one of
skyvm's dependencies: ``./dev run airflow -- uv pip install apache-airflow-providers-docker``
(the scenario is skipped, saying so, without it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import scenario
from bench.common import BenchError, Skip, build_node_image, need_docker, package_version


def _airflow_home(b) -> Path:
    """Set up Airflow's configuration before Airflow is first imported, and migrate its DB."""
    if "airflow" in sys.modules and not os.environ.get("SKYVM_BENCH_AIRFLOW_HOME"):
        raise Skip("Airflow was imported before the bench could give it a throwaway AIRFLOW_HOME")
    home = Path(os.environ.get("SKYVM_BENCH_AIRFLOW_HOME") or tempfile.mkdtemp(prefix="skyvm-bench-airflow-"))
    dags = home / "dags"
    dags.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        {
            "SKYVM_BENCH_AIRFLOW_HOME": str(home),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING"),
        }
    )
    if not (home / ".migrated").exists():
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], capture_output=True, text=True, env=os.environ.copy(), timeout=600)
        if out.returncode != 0:
            raise BenchError(f"airflow db migrate failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")
        (home / ".migrated").touch()
        print(f"  Airflow DB migrated in {time.perf_counter() - t0:.1f} s (not counted)", flush=True)
    return home


# dag.test() runs a DAG that its bundle (the DAGs folder) holds: the DAGs are written to a file there.
DAG_FILE = """# Written by bench/airflow_dag.py for one bench run.
from airflow.providers.docker.operators.docker import DockerOperator
from airflow.sdk import DAG

from airflow_skyvm.operators.skyvm import SkyVMOperator
from bench import nodefns

N, IMAGE, SESSION, DOCKER_URL = {n!r}, {image!r}, {session!r}, {docker_url!r}
LABELS = {labels!r}
KEEP = {keep!r}


def make(kind):
    with DAG(f"skyvm_bench_{{kind}}", schedule=None, catchup=False) as dag:
        for i in range(N):
            if kind == "docker":
                DockerOperator(
                    task_id=f"t{{i}}", image=IMAGE, command=["python3", "-c", f"print({{i}}*{{i}})"], docker_url=DOCKER_URL,
                    network_mode="host", auto_remove="force", mount_tmp_dir=False, labels={{"dev.skyvm.bench": SESSION}},
                )
            else:
                warm = kind == "skyvm_warm"
                labels = {{**LABELS, "kind": kind, **(KEEP if warm else {{}})}}
                SkyVMOperator(
                    task_id=f"t{{i}}", python_callable=nodefns.square, op_args=[i],
                    sky_settings={{"labels": labels, "down": not warm, "idle_minutes_to_autostop": 10}},
                )
    return dag


docker, skyvm_cold, skyvm_warm = make("docker"), make("skyvm_cold"), make("skyvm_warm")
"""


def _write_dag_file(b, path: Path, image: str) -> dict:
    """The three DAGs, in a file of the DAGs folder, imported as Airflow imports it."""
    import importlib.util

    from bench.common import KEEP_KEY

    labels = b.labels()
    path.write_text(
        DAG_FILE.format(n=b.n, image=image, session=b.session, docker_url=os.environ.get("DOCKER_HOST") or "unix://var/run/docker.sock", labels=labels, keep={KEEP_KEY: "1"})
    )
    spec = importlib.util.spec_from_file_location("skyvm_bench_dags", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["skyvm_bench_dags"] = module
    spec.loader.exec_module(module)
    return {"docker": module.docker, "skyvm_cold": module.skyvm_cold, "skyvm_warm": module.skyvm_warm}


@scenario(
    "airflow",
    env="airflow",
    help="a DAG of N tasks: SkyVMOperator cold and warm vs DockerOperator, through dag.test()",
    n=10,
    reps=3,
    smoke_n=2,
)
def airflow_bench(b) -> None:
    import importlib.util

    if importlib.util.find_spec("airflow") is None:
        raise Skip("needs Airflow: ./dev run airflow -- python -m bench airflow")
    # Not find_spec("airflow.providers.docker"): that imports Airflow, before its home is set.
    if package_version("apache-airflow-providers-docker") is None:
        raise Skip(
            "the Docker provider is not installed in this environment (it is not a skyvm dependency): "
            "./dev run airflow -- uv pip install apache-airflow-providers-docker"
        )
    need_docker()
    home = _airflow_home(b)
    b.on_exit(lambda: __import__("shutil").rmtree(home, ignore_errors=True))
    b.params.update(airflow=package_version("apache-airflow"), docker_provider=package_version("apache-airflow-providers-docker"))
    image = build_node_image(b)
    dags = _write_dag_file(b, home / "dags" / "skyvm_bench_dags.py", image)

    def run_dag(kind: str) -> float:
        dag = dags[kind]
        t0 = time.perf_counter()
        dr = dag.test()
        elapsed = time.perf_counter() - t0
        tis = dr.get_task_instances()
        states = {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in tis}
        b.check(states == {f"t{i}": "success" for i in range(b.n)}, f"{kind}: task states {states}")
        for ti in tis:
            i = int(ti.task_id[1:])
            value = ti.xcom_pull(task_ids=ti.task_id, run_id=dr.run_id)
            b.check(value is not None and int(value) == i * i, f"{kind}: {ti.task_id}'s XCom is {value!r}, expected {i * i}")
        return elapsed

    # Uncounted: the first dag.test() of the process, and the warm cluster started.
    for kind in ("docker", "skyvm_warm"):
        print(f"  warm-up {kind}: {run_dag(kind):.2f} s (not counted)", flush=True)
    names = {"SkyVMOperator cold": "skyvm_cold", "SkyVMOperator warm": "skyvm_warm", "DockerOperator": "docker"}
    b.alternate({label: (lambda rep, kind=kind, label=label: b.add(label, run_dag(kind))) for label, kind in names.items()})

    cold = b.ratio("SkyVMOperator cold / DockerOperator", "SkyVMOperator cold", "DockerOperator")
    warm = b.ratio("SkyVMOperator warm / DockerOperator", "SkyVMOperator warm", "DockerOperator")
    b.target(
        "SkyVMOperator / DockerOperator",
        cold,
        "<=",
        1.0,
        "x",
        "a cold SkyVM task is a Run of its own: the cluster container starts with its agent, the node is forked, "
        "and the run's end removes the container (down: true) inside the task, beside skyvm's image and settings checks; "
        "DockerOperator runs one container",
    )
    b.target(
        "SkyVMOperator warm / DockerOperator",
        warm,
        "<=",
        0.5,
        "x",
        "a warm SkyVM task is one exec of the node runtime (Python and skyvm.node's imports: see floor's 'import skyvm.node'), "
        "plus the operator's settings, payload and result; dag.test() runs the tasks one at a time, so nothing overlaps",
    )

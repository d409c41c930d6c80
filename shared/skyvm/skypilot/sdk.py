"""The SDK adapter: the bridge's calls answered by SkyPilot's SDK in this process.

Nothing else in skyvm imports ``sky``. ``InProcessBridge`` runs wherever SkyPilot is importable:
in the engine's process when it shares an environment with SkyPilot, else inside the bridge
server (``rpc_server``) in SkyPilot's own environment. Requests go through SkyPilot's API
server, local or remote. ``optimize`` is planning (``skyvm plan``, the cost cap before a
launch): SkyPilot's optimizer on its catalogs with no cloud access (see ``optimizer``).

May import: the standard library, ``sky`` (here only), yaml, and ``skyvm.skypilot.interface``,
``.logs``, ``.optimizer``.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

from skyvm.skypilot.interface import ANSI, LogSink
from skyvm.skypilot.logs import LogFollowers
from skyvm.skypilot.optimizer import PLANNING_CLOUDS, _clouds_assumed_enabled, _clouds_named


class _LineStream:
    """A text stream that hands each complete line to a callback (SkyPilot's ``output_stream``).

    Colour codes are dropped: the lines end up in Prefect's and Airflow's task logs.
    """

    def __init__(self, on_log: Optional[LogSink]):
        self.on_log = on_log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.buf = ""

    def write(self, text: str) -> int:
        self.buf += text.replace("\r", "\n")
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            line = ANSI.sub("", line).rstrip()
            if line:
                self.on_log(line)
        return len(text)

    def isatty(self) -> bool:
        return False

    def flush(self) -> None:
        line = ANSI.sub("", self.buf).rstrip()
        self.buf = ""
        if line:
            self.on_log(line)


def placement(resources) -> dict:
    """Where a cluster landed and its price, from SkyPilot's launched resources."""
    if resources is None:
        return {}
    try:
        return {
            "cloud": str(resources.cloud).lower(),
            "region": resources.region,
            "zone": resources.zone,
            "instance_type": resources.instance_type,
            "use_spot": bool(resources.use_spot),
            "hourly_price": round(float(resources.get_cost(3600)), 4),
        }
    except Exception:  # noqa: BLE001 - a price we cannot read is left out, not fatal
        return {}


class InProcessBridge:
    """SkyPilot's SDK in this process (requests go through its API server, local or remote)."""

    def __init__(self):
        import sky  # the only place skyvm imports SkyPilot

        self.sky = sky
        self._logs = LogFollowers(self)

    def _task(self, task: dict):
        return self.sky.Task.from_yaml_config(dict(task))

    def _stream_and_get(self, request_id, on_log):
        # The request's own log (optimizer table, provisioning) goes to the engine's log, line by line.
        stream = _LineStream(on_log)
        try:
            return self.sky.stream_and_get(request_id, output_stream=stream)
        finally:
            stream.flush()

    def launch(self, task, cluster_name, *, idle_minutes_to_autostop=None, down=False, retry_until_up=False, dryrun=False, on_log=None, options=None):
        # options: the settings' skypilot.launch pass-through, sky.launch arguments skyvm does not model.
        rid = self.sky.launch(
            self._task(task), cluster_name=cluster_name, idle_minutes_to_autostop=idle_minutes_to_autostop, down=down,
            retry_until_up=retry_until_up, dryrun=dryrun, **(options or {}),
        )
        job_id, handle = self._stream_and_get(rid, on_log)
        return {"job_id": job_id, "cluster": cluster_name, "dryrun": bool(dryrun), **placement(getattr(handle, "launched_resources", None))}

    def exec(self, task, cluster_name, on_log=None):
        job_id, _handle = self._stream_and_get(self.sky.exec(self._task(task), cluster_name=cluster_name), on_log)
        return {"job_id": job_id, "cluster": cluster_name}

    def job_status(self, cluster_name, job_id):
        statuses = self.sky.get(self.sky.job_status(cluster_name, [job_id]))
        status = statuses.get(job_id) if statuses else None
        return None if status is None else status.value

    def tail_logs(self, cluster_name, job_id, on_log=None, follow=True):
        stream = _LineStream(on_log)
        # The exit code says whether the job failed (100): never ignore it.
        code = self.sky.tail_logs(cluster_name, job_id, follow=follow, output_stream=stream)
        stream.flush()
        return int(code)

    def read_log(self, cluster_name, job_id, offset=0, managed=False, final=False):
        return self._logs.read(cluster_name, job_id, offset, managed, final)

    def cancel(self, cluster_name, job_id):
        self.sky.get(self.sky.cancel(cluster_name, job_ids=[job_id]))

    def down(self, cluster_name):
        try:
            self.sky.get(self.sky.down(cluster_name))
        except self.sky.exceptions.ClusterDoesNotExist:
            pass  # already gone (or a launch that never got as far as a VM): nothing is left to pay for

    def autostop(self, cluster_name, idle_minutes, down):
        self.sky.get(self.sky.autostop(cluster_name, idle_minutes, down=down))

    def status(self, cluster_names=None):
        records = self.sky.get(self.sky.status(cluster_names))
        out = []
        for r in records:
            status = r.get("status") if isinstance(r, dict) else getattr(r, "status", None)
            get = r.get if isinstance(r, dict) else (lambda k, r=r: getattr(r, k, None))
            out.append({
                "name": get("name"),
                "status": getattr(status, "value", status),
                "labels": get("labels") or {},
                "resources": get("resources_str"),
                "autostop": get("autostop"),
                "to_down": get("to_down"),
                "launched_at": get("launched_at"),
            })
        return out

    def ssh_info(self, cluster_name):
        """What ``ssh <cluster>`` uses, from the cluster's handle and the credentials the API server hands
        its client (the key's text when the server is remote): the head's first address and SSH port."""
        import os

        from sky.skylet.constants import DEFAULT_DOCKER_PORT

        records = self.sky.get(self.sky.status([cluster_name], _include_credentials=True))
        for record in records or []:
            handle, creds = record.get("handle"), record.get("credentials") or {}
            if handle is None or not handle.cached_external_ips or not creds:
                return None  # not UP, or no SSH access SkyPilot hands out (the caller uses `sky exec`)
            key = creds.get("ssh_private_key_content")
            if key is None and creds.get("ssh_private_key"):
                with open(os.path.expanduser(creds["ssh_private_key"])) as fh:
                    key = fh.read()
            if key is None:
                return None
            ports = handle.cached_external_ssh_ports or [22]
            info = {
                "host": handle.cached_external_ips[0], "port": int(ports[0]), "user": handle.ssh_user or creds.get("ssh_user"),
                "private_key": key, "host_key": None, "proxy_command": creds.get("ssh_proxy_command"), "docker": None,
            }
            if handle.docker_user:
                # SkyPilot's container runs its own sshd on the VM's loopback; `ssh <cluster>` jumps there.
                info["docker"] = {"host": "localhost", "port": DEFAULT_DOCKER_PORT, "user": handle.docker_user, "host_key": None}
            return info
        return None

    def jobs_launch(self, task, name, on_log=None, pool=None):
        job_ids, _handle = self._stream_and_get(self.sky.jobs.launch(self._task(task), name=name, pool=pool), on_log)
        job_id = job_ids[0] if isinstance(job_ids, list) else job_ids
        return {"job_id": job_id}

    def jobs_status(self, job_id):
        result = self.sky.get(self.sky.jobs.queue_v2(refresh=False, job_ids=[job_id]))
        jobs = result[0] if isinstance(result, tuple) else result
        for job in jobs:
            job = job if isinstance(job, dict) else getattr(job, "model_dump", lambda: vars(job))()
            if job.get("job_id") == job_id:
                status = job.get("status")
                return {"status": getattr(status, "value", status), "recovery_count": job.get("recovery_count", 0)}
        return {"status": None, "recovery_count": 0}

    def jobs_cancel(self, job_id):
        self.sky.get(self.sky.jobs.cancel(job_ids=[job_id]))

    def jobs_logs(self, job_id, on_log=None, follow=True):
        stream = _LineStream(on_log)
        code = self.sky.jobs.tail_logs(job_id=job_id, follow=follow, output_stream=stream)
        stream.flush()
        return int(code or 0)

    def check(self, clouds=None):
        """SkyPilot's own credential check: {cloud: [capabilities]} of the enabled clouds."""
        result = self.sky.get(self.sky.check(tuple(clouds) if clouds else None, verbose=False))
        merged: dict = {}
        for per_cloud in (result or {}).values():
            for cloud, caps in (per_cloud or {}).items():
                merged[str(cloud).lower()] = list(caps or [])
        return merged

    def api_stop(self):
        self.sky.api_stop()

    def pool_apply(self, task, pool_name, on_log=None):
        """Make the pool (or apply the same config to it again: a rolling update changes nothing)."""
        from sky.serve import UpdateMode

        self._stream_and_get(self.sky.jobs.pool_apply(self._task(task), pool_name, mode=UpdateMode.ROLLING), on_log)

    def pool_status(self, pool_names=None):
        import yaml

        try:
            records = self.sky.get(self.sky.jobs.pool_status(pool_names)) or []
        except self.sky.exceptions.ClusterNotUpError:
            return []  # no jobs controller yet, so no pool (the first pool_apply starts one)
        out = []
        for r in records:
            # The pool's labels live in its task (the workers' resources): read them from its YAML.
            config = yaml.safe_load(r.get("pool_yaml") or "") or {}
            resources = config.get("resources") or {}
            status = r.get("status")
            out.append({
                "name": r.get("name"),
                "status": getattr(status, "value", status),
                "labels": dict(resources.get("labels") or {}) if isinstance(resources, dict) else {},
                "workers": len(r.get("replica_info") or []),
                "target_workers": r.get("target_num_replicas"),
                "resources": r.get("requested_resources_str") or "",
            })
        return out

    def pool_down(self, pool_name):
        try:
            self.sky.get(self.sky.jobs.pool_down(pool_name))
        except self.sky.exceptions.ClusterNotUpError:
            pass  # no jobs controller: no pool is left to pay for
        except ValueError as exc:
            if "not found" not in str(exc).lower() and "does not exist" not in str(exc).lower():
                raise  # a pool already gone leaves nothing to pay for

    def optimize(self, tasks, clouds=None):
        """Where SkyPilot's optimizer would put each task and its $/h (or SkyPilot's reason), from
        the catalogs of this process's SkyPilot, with no cloud access. Equal tasks are optimized once:
        a plan of 1,000 nodes of 5 signatures asks SkyPilot 5 times."""
        answers: dict[str, dict] = {}
        out = []
        for task in tasks:
            key = json.dumps(task, sort_keys=True, default=str)
            if key not in answers:
                answers[key] = self._optimize_one(task, clouds)
            out.append(answers[key])
        return out

    def _optimize_one(self, task, clouds):
        named = _clouds_named(task.get("resources") or {})
        with _clouds_assumed_enabled(self.sky, clouds or named or list(PLANNING_CLOUDS)):
            t = self._task(task)
            with self.sky.Dag() as dag:
                dag.add(t)
            try:
                self.sky.optimizer.Optimizer.optimize(dag, quiet=True)
            except Exception as exc:  # noqa: BLE001 - SkyPilot's reason is the answer
                reason = ANSI.sub("", " ".join(str(exc).split()))
                return {"error": reason[:600] or type(exc).__name__}
            best = t.best_resources
            return {**placement(best), "accelerators": dict(best.accelerators or {})}

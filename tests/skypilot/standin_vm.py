"""A recording stand-in for SkyPilot at the one seam where a cloud would be provisioned, served
across the process boundary exactly as ``python -m skyvm.skypilot.bridge CALL`` is.

``standin-python`` (beside this file) is what ``SKYVM_SKYPILOT_PYTHON`` points at in a test:
skyvm's ``SubprocessBridge`` runs it as it would run SkyPilot's environment, and its calls
land here, in SkyPilot's environment (``$SKYVM_TEST_SKYPILOT_PYTHON``), answered through the
bridge's own protocol (``serve``). State is kept in files, as if on VMs, so it outlives any one
bridge process (an Airflow task and its trigger run in different processes).

What a cloud VM would do is done on this machine, with real parts:
- every task is parsed by SkyPilot's own ``sky.Task.from_yaml_config`` (a task SkyPilot would
  refuse fails here too);
- "provisioning" a cluster logs in to the registry with the task's ``SKYPILOT_DOCKER_*``
  secrets (as SkyPilot does on the VM), pulls ``image_id: docker:<image>`` and starts it as a
  container with the task's docker run options, then runs ``setup`` in it;
- a job is ``run`` executed in that container with the task's envs and secrets (values in the
  environment, names only on argv); its log and exit code are kept so ``tail_logs`` follows it;
- the container gets what SkyPilot gives a docker-image cluster: its own ``sshd`` (Debian's
  openssh-server, from the .debs ``./dev setup`` downloads; on a free loopback port), a key
  pair of the cluster's own and a host key; ``ssh_info`` hands them out as the cluster's handle
  and SkyPilot's credentials do (``SKYVM_STANDIN_SSH=0``: no SSH, as a cluster without it);
- ``down`` removes the container.

State lives in ``$SKYVM_STANDIN_DIR``: every call is appended to ``calls.jsonl`` with secret
values left out, so a test can check what was asked.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from skyvm.skypilot.bridge import FAILED_JOB_EXIT, serve

STATE = Path(os.environ["SKYVM_STANDIN_DIR"])
LABEL = "dev.skyvm.standin"
# Debian's openssh-server and what it needs beyond the base image (./dev setup downloads them).
SSHD_DEBS = Path(os.environ.get("SKYVM_STANDIN_SSHD_DEBS") or Path(__file__).resolve().parents[2] / ".dev" / "sshd-debs")


# What a cloud's SDK in SkyPilot's process would read; recorded by name, files by mode, never values.
_CREDENTIAL_VARS = ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS",
                    "AZURE_CLIENT_ID", "KUBECONFIG", "SKY_RUNTIME_DIR", "SKYPILOT_API_SERVER_LOCAL_PORT")


def _credentials_seen() -> dict:
    seen = {}
    for name in _CREDENTIAL_VARS:
        value = os.environ.get(name)
        if value is None:
            continue
        path = Path(value)
        if name.endswith(("_FILE", "_CREDENTIALS", "KUBECONFIG")) and path.is_file():
            seen[name] = {"file": str(path), "mode": oct(path.stat().st_mode & 0o777), "dir_mode": oct(path.parent.stat().st_mode & 0o777)}
        elif name in ("AWS_PROFILE", "SKY_RUNTIME_DIR", "SKYPILOT_API_SERVER_LOCAL_PORT"):
            seen[name] = value
        else:
            seen[name] = "set"
    expiry = _minted_expiry()
    if expiry is not None:
        seen["aws_expiry"] = expiry
    return seen


_boto_session = None


def _minted_expiry():
    """When the minted AWS keys this process's boto3 holds expire (a credential_process profile):
    one session for the process's life, as SkyPilot's long-lived server keeps one."""
    global _boto_session
    config = os.environ.get("AWS_CONFIG_FILE")
    if not config or "credential_process" not in Path(config).read_text():
        return None
    import boto3

    if _boto_session is None:
        _boto_session = boto3.Session()
    creds = _boto_session.get_credentials()
    creds.get_frozen_credentials()  # renews through the process when botocore finds them near expiry
    return creds._expiry_time.timestamp()  # botocore keeps no public accessor for it


def _container(cluster: str) -> str:
    return f"skyvm-standin-{cluster}"[:120]


class VMStandIn:
    def __init__(self):
        (STATE / "clusters").mkdir(parents=True, exist_ok=True)
        (STATE / "jobs").mkdir(parents=True, exist_ok=True)

    # -- bookkeeping ---------------------------------------------------------

    def _record(self, call: str, **data) -> None:
        with open(STATE / "calls.jsonl", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.write(json.dumps({"call": call, "pid": os.getpid(), "t": time.time(), "credentials": _credentials_seen(), **data}) + "\n")

    @staticmethod
    def _public(task: dict) -> dict:
        # What was asked, with secret values replaced by their names.
        return {**task, "secrets": sorted(task.get("secrets", {}))}

    def _cluster_file(self, name: str) -> Path:
        return STATE / "clusters" / f"{name}.json"

    def _cluster(self, name: str) -> dict:
        path = self._cluster_file(name)
        if not path.exists():
            import sky

            raise sky.exceptions.ClusterDoesNotExist(f"Cluster {name!r} does not exist.")
        return json.loads(path.read_text())

    def _save(self, name: str, record: dict) -> None:
        self._cluster_file(name).write_text(json.dumps(record))

    def _next_job(self) -> int:
        with open(STATE / "job-counter", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0)
            n = int(fh.read() or 0) + 1
            fh.seek(0)
            fh.truncate()
            fh.write(str(n))
        return n

    # -- the "VM" ----------------------------------------------------------------

    def _check(self, task: dict):
        import sky  # only the calls that carry a task pay for importing SkyPilot

        return sky.Task.from_yaml_config(json.loads(json.dumps(task)))  # a copy: SkyPilot's parser edits what it is given

    def _pull(self, task: dict, on_log) -> str:
        """Log in with the task's registry secrets (fresh every launch and exec, as on the VM) and pull."""
        image = task["resources"]["image_id"].removeprefix("docker:")
        secrets = task.get("secrets", {})
        with tempfile.TemporaryDirectory() as config:
            if secrets.get("SKYPILOT_DOCKER_USERNAME"):
                login = subprocess.run(
                    ["docker", "--config", config, "login", "--username", secrets["SKYPILOT_DOCKER_USERNAME"], "--password-stdin", secrets["SKYPILOT_DOCKER_SERVER"]],
                    input=secrets.get("SKYPILOT_DOCKER_PASSWORD", ""), capture_output=True, text=True,
                )
                self._record("docker_login", server=secrets["SKYPILOT_DOCKER_SERVER"], ok=login.returncode == 0)
                if login.returncode != 0:
                    raise RuntimeError(f"docker login to {secrets['SKYPILOT_DOCKER_SERVER']} failed on the VM: {login.stderr.strip()}")
            pull = subprocess.run(["docker", "--config", config, "pull", "-q", image], capture_output=True, text=True)
        if pull.returncode != 0:
            raise RuntimeError(f"docker pull {image} failed on the VM: {pull.stderr.strip()}")
        on_log(f"(stand-in VM) pulled {image}")
        return image

    def _env(self, task: dict) -> tuple[list[str], dict]:
        values = {**task.get("envs", {}), **task.get("secrets", {})}
        names = [a for k in values for a in ("-e", k)]
        return names, {**os.environ, **{k: str(v) for k, v in values.items()}}

    def _submit(self, cluster: str, task: dict) -> int:
        job_id = self._next_job()
        job_dir = STATE / "jobs" / cluster
        job_dir.mkdir(parents=True, exist_ok=True)
        names, env = self._env(task)
        env["SKYVM_STANDIN_RUN"] = task["run"]
        cmd = " ".join(["docker", "exec", *names, shlex.quote(_container(cluster)), "sh", "-c", '"$SKYVM_STANDIN_RUN"'])
        argv = shlex.split(task["run"])
        attempt = argv[argv.index("--attempt") + 1]
        (job_dir / f"{job_id}.attempt").write_text(attempt)
        # Detached from this call's process (each bridge call is one process), as a job on a VM is.
        subprocess.Popen(
            ["sh", "-c", f'{cmd} > {job_dir}/{job_id}.log 2>&1; echo $? > {job_dir}/{job_id}.rc.tmp; mv {job_dir}/{job_id}.rc.tmp {job_dir}/{job_id}.rc'],
            env=env, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        return job_id

    # -- the bridge's calls ----------------------------------------------------------

    def launch(self, task, cluster_name, *, idle_minutes_to_autostop=None, down=False, retry_until_up=False, dryrun=False, on_log=print):
        parsed = self._check(task)
        self._record("launch", cluster=cluster_name, task=self._public(task), idle_minutes_to_autostop=idle_minutes_to_autostop, down=down, retry_until_up=retry_until_up)
        self._provision(parsed, task, cluster_name, {"autostop": idle_minutes_to_autostop, "to_down": down}, on_log)
        job_id = self._submit(cluster_name, task) if task.get("run") else None  # setup only: no job, as sky.launch
        return {"job_id": job_id, "cluster": cluster_name, "dryrun": False, "cloud": "aws", "region": "us-east-1", "zone": None,
                "instance_type": "m7i.large", "use_spot": False, "hourly_price": 0.1008}

    def _provision(self, parsed, task, cluster_name, record: dict, on_log) -> None:
        """A VM up with the task's container running and its setup done."""
        on_log(f"(stand-in VM) provisioning {cluster_name}")
        image = self._pull(task, on_log)
        (resources,) = list(parsed.resources)
        self._save(cluster_name, {"status": "INIT", "labels": dict(resources.labels or {}), **record})
        self._slow_cloud(cluster_name)
        run_options = (task.get("config") or {}).get("docker", {}).get("run_options", [])
        if os.environ.get("SKYVM_STANDIN_SSH", "1") != "0":
            image = self._sshd_image(image)
        started = subprocess.run(
            ["docker", "run", "-d", "--name", _container(cluster_name), "--network", "host", "--label", f"{LABEL}={STATE}", *run_options, image, "sleep", "infinity"],
            capture_output=True, text=True,
        )
        if started.returncode != 0:
            raise RuntimeError(f"starting the node container failed: {started.stderr.strip()}")
        if os.environ.get("SKYVM_STANDIN_SSH", "1") != "0":
            self._save(cluster_name, {**self._cluster(cluster_name), "ssh": self._start_sshd(cluster_name)})
        names, env = self._env(task)
        setup = subprocess.run(["docker", "exec", *names, _container(cluster_name), "sh", "-c", task["setup"]], env=env, capture_output=True, text=True)
        if setup.returncode != 0:
            raise RuntimeError(f"setup failed on {cluster_name}: {setup.stdout[-2000:]}{setup.stderr[-2000:]}")
        self._save(cluster_name, {**self._cluster(cluster_name), "status": "UP"})

    def _sshd_image(self, image: str) -> str:
        """The node image with Debian's openssh-server in it (built once per image, as SkyPilot
        installs openssh-server in a docker-image cluster's container)."""
        debs = sorted(SSHD_DEBS.glob("*.deb")) if SSHD_DEBS.is_dir() else []
        if not any(p.name.startswith("openssh-server_") for p in debs):
            raise RuntimeError(f"no openssh-server .deb in {SSHD_DEBS}: run ./dev setup (or set SKYVM_STANDIN_SSH=0)")
        image_id = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", image], capture_output=True, text=True, check=True).stdout.strip()
        tag = f"skyvm-standin-sshd:{image_id.split(':')[-1][:16]}"
        if subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0:
            return tag
        dockerfile = f"FROM {image}\nCOPY *.deb /tmp/sshd-debs/\nRUN dpkg -i /tmp/sshd-debs/*.deb && rm -rf /tmp/sshd-debs /etc/ssh/ssh_host_* && mkdir -p /run/sshd\n"
        built = subprocess.run(["docker", "build", "-q", "-t", tag, "-f", "-", str(SSHD_DEBS)], input=dockerfile, capture_output=True, text=True)
        if built.returncode != 0:
            raise RuntimeError(f"building the stand-in's sshd image failed: {built.stderr[-2000:]}")
        return tag

    def _start_sshd(self, cluster_name: str) -> dict:
        """sshd in the cluster's container on a free loopback port, with a client key and a host key of
        the cluster's own (ed25519, as SkyPilot makes): what ``ssh_info`` hands out."""
        import socket

        container = _container(cluster_name)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        script = (
            "set -e; mkdir -p /root/.ssh /run/sshd; chmod 700 /root/.ssh; "
            "ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/standin_host_key; ssh-keygen -q -t ed25519 -N '' -f /tmp/standin_client_key; "
            "cp /tmp/standin_client_key.pub /root/.ssh/authorized_keys; "
            f"/usr/sbin/sshd -p {port} -h /etc/ssh/standin_host_key -o ListenAddress=127.0.0.1 -o UsePAM=no "
            "-o PasswordAuthentication=no -o PermitRootLogin=prohibit-password -o AllowStreamLocalForwarding=yes; "
            "cat /tmp/standin_client_key; echo ====; cat /etc/ssh/standin_host_key.pub; rm /tmp/standin_client_key*"
        )
        out = subprocess.run(["docker", "exec", container, "sh", "-c", script], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"starting sshd in {cluster_name} failed: {out.stderr[-2000:]}")
        key, host_key = out.stdout.split("====\n")
        return {"host": "127.0.0.1", "port": port, "user": "root", "private_key": key, "host_key": host_key.strip(), "proxy_command": None, "docker": None}

    def ssh_info(self, cluster_name):
        self._record("ssh_info", cluster=cluster_name)
        record = self._cluster(cluster_name)
        return record.get("ssh") if record["status"] == "UP" else None

    def _slow_cloud(self, cluster_name) -> None:
        """``SKYVM_STANDIN_PROVISION_S``: the VM takes this long to come up (a slow cloud, a busy
        region). Downed meanwhile, the launch fails as SkyPilot's does when its VM is terminated
        under the provisioner, and nothing more is made."""
        deadline = time.monotonic() + float(os.environ.get("SKYVM_STANDIN_PROVISION_S") or 0)
        while time.monotonic() < deadline:
            if not self._cluster_file(cluster_name).exists():
                self._record("provisioning_aborted", cluster=cluster_name)
                raise RuntimeError(f"cluster {cluster_name} was terminated while provisioning")
            time.sleep(0.1)

    def exec(self, task, cluster_name, on_log=print):
        self._check(task)
        self._record("exec", cluster=cluster_name, task=self._public(task))
        if self._cluster(cluster_name)["status"] != "UP":
            raise RuntimeError(f"exec on {cluster_name}, which is not UP")
        self._pull(task, on_log)
        return {"job_id": self._submit(cluster_name, task), "cluster": cluster_name}

    def _job(self, cluster_name, job_id) -> Path:
        return STATE / "jobs" / cluster_name / str(job_id)

    def tail_logs(self, cluster_name, job_id, on_log=print, follow=True):
        self._record("tail_logs", cluster=cluster_name, job_id=job_id, follow=follow)
        base = self._job(cluster_name, job_id)
        log, rc = Path(f"{base}.log"), Path(f"{base}.rc")
        if not follow:
            # What is there now (SkyPilot's follow=False); the code says nothing until the job ends.
            for line in (log.read_text().splitlines() if log.exists() else []):
                on_log(line)
            return (0 if int(rc.read_text()) == 0 else FAILED_JOB_EXIT) if rc.exists() else 0
        while not log.exists():
            time.sleep(0.05)
        with open(log) as fh:
            while True:
                line = fh.readline()
                if line:
                    on_log(line.rstrip("\n"))
                    continue
                if rc.exists():
                    rest = fh.read()
                    for extra in rest.splitlines():
                        on_log(extra)
                    break
                time.sleep(0.05)
        return 0 if int(rc.read_text()) == 0 else FAILED_JOB_EXIT

    def job_status(self, cluster_name, job_id):
        self._record("job_status", cluster=cluster_name, job_id=job_id)
        self._cluster(cluster_name)  # a cluster that is gone has no job queue to ask (SkyPilot raises too)
        return self._state(cluster_name, job_id)

    def _state(self, cluster_name, job_id):
        base = self._job(cluster_name, job_id)
        if Path(f"{base}.cancelled").exists():
            return "CANCELLED"
        rc = Path(f"{base}.rc")
        if not rc.exists():
            return "RUNNING"
        return "SUCCEEDED" if int(rc.read_text()) == 0 else "FAILED"

    def cancel(self, cluster_name, job_id):
        self._record("cancel", cluster=cluster_name, job_id=job_id)
        base = self._job(cluster_name, job_id)
        Path(f"{base}.cancelled").touch()
        attempt = Path(f"{base}.attempt").read_text()
        subprocess.run(["docker", "exec", _container(cluster_name), "python3", "-m", "skyvm.node", "cancel", "--attempt", attempt], capture_output=True)

    def down(self, cluster_name):
        self._record("down", cluster=cluster_name)
        subprocess.run(["docker", "rm", "-f", _container(cluster_name)], capture_output=True)
        self._cluster_file(cluster_name).unlink(missing_ok=True)

    def autostop(self, cluster_name, idle_minutes, down):
        self._record("autostop", cluster=cluster_name, idle_minutes=idle_minutes, down=down)
        self._save(cluster_name, {**self._cluster(cluster_name), "autostop": idle_minutes, "to_down": down})

    def status(self, cluster_names=None):
        self._record("status")
        out = []
        for path in sorted((STATE / "clusters").glob("*.json")):
            if cluster_names and path.stem not in cluster_names:
                continue
            rec = json.loads(path.read_text())
            if rec.get("pool"):
                continue  # a pool's worker: listed by pool_status, as SkyPilot lists them under the pool
            out.append({"name": path.stem, "status": rec["status"], "labels": rec["labels"], "resources": "1x AWS(m7i.large)", "autostop": rec["autostop"], "to_down": rec["to_down"]})
        return out

    # Managed jobs: a cluster of their own, gone when the job ends (as SkyPilot's controller does),
    # or a job on a pool's warm worker.
    def jobs_launch(self, task, name, on_log=print, pool=None):
        self._check(task)
        job_id = self._next_job()
        self._record("jobs_launch", name=name, job_id=job_id, pool=pool, task=self._public(task))
        if pool is not None:
            self._pool_job(task, pool, job_id)
            return {"job_id": job_id}
        answer = self.launch(task, f"managed-{job_id}", down=True, on_log=on_log)
        (STATE / "jobs" / f"managed-{job_id}.inner").write_text(str(answer["job_id"]))
        return {"job_id": job_id}

    def _inner(self, job_id) -> tuple[str, int]:
        where = STATE / "jobs" / f"managed-{job_id}.where"
        if where.exists():  # a pool job: on the worker the pool's scheduler gave it
            cluster, inner = where.read_text().split()
            return cluster, int(inner)
        return f"managed-{job_id}", int((STATE / "jobs" / f"managed-{job_id}.inner").read_text())

    def jobs_logs(self, job_id, on_log=print, follow=True):
        pooled = self._pool_of(job_id)
        if pooled is not None:
            while follow and self._schedule(pooled) and self._pool_job_state(job_id) == "PENDING":
                time.sleep(0.1)  # waiting for a free worker, as `sky jobs logs` waits for the job to start
            if self._pool_job_state(job_id) in ("PENDING", "CANCELLED") and not self._placed(job_id):
                return 0
        cluster, inner = self._inner(job_id)
        code = self.tail_logs(cluster, inner, on_log=on_log, follow=follow)
        if pooled is None and (follow or self._state(cluster, inner) != "RUNNING"):
            self.down(cluster)  # the job is over: SkyPilot's controller tears its cluster down (a pool's worker stays)
        return code

    def jobs_status(self, job_id):
        self._record("jobs_status", job_id=job_id)
        pooled = self._pool_of(job_id)
        if pooled is not None:
            self._schedule(pooled)
            state = self._pool_job_state(job_id)
            if state is not None:
                return {"status": state, "recovery_count": 0}
        cluster, inner = self._inner(job_id)
        return {"status": self._state(cluster, inner), "recovery_count": 0}

    def jobs_cancel(self, job_id):
        self._record("jobs_cancel", job_id=job_id)
        pooled = self._pool_of(job_id)
        if pooled is not None and not self._placed(job_id):
            (STATE / "jobs" / f"managed-{job_id}.cancelled").touch()  # never started: it never will
            (STATE / "jobs" / f"managed-{job_id}.task").unlink(missing_ok=True)
            return
        cluster, inner = self._inner(job_id)
        self.cancel(cluster, inner)
        if pooled is None:
            self.down(cluster)

    # -- pools -----------------------------------------------------------------------------
    # SkyPilot runs a pool from its jobs controller: a VM of its own (or, in consolidation mode, the
    # API server) that provisions the workers through a cloud and schedules jobs onto them. Neither
    # can run on a machine that reaches no cloud, so the stand-in sits at the narrowest seam, the
    # jobs/pool SDK calls the bridge makes, and holds them to what SkyPilot does:
    # - a pool's task is parsed by SkyPilot and checked by its own validate_service_task(pool=True)
    #   (no job_recovery, no ordered resources), and skyvm's carries setup only, no run;
    # - a job on a pool has no setup, workdir or file mounts, and exactly the pool's resources;
    # - each worker (a container, provisioned as a VM is above) runs one job at a time; the others
    #   wait PENDING and start, in order, when a worker frees up.

    def _pool_file(self, name: str) -> Path:
        (STATE / "pools").mkdir(exist_ok=True)
        return STATE / "pools" / f"{name}.json"

    def _pool_lock(self, name: str):
        fh = open(STATE / "pools" / f"{name}.lock", "a")
        fcntl.flock(fh, fcntl.LOCK_EX)
        return fh

    def pool_apply(self, task, pool_name, on_log=print):
        from sky.serve import serve_utils

        parsed = self._check(task)
        self._record("pool_apply", pool=pool_name, task=self._public(task))
        if parsed.service is None or not parsed.service.pool:
            raise ValueError(f"pool {pool_name}: the task has no pool: section")
        serve_utils.validate_service_task(parsed, pool=True)
        if "run" in task:
            raise ValueError(f"pool {pool_name}: skyvm's pool task must carry setup only; its jobs bring their run")
        path = self._pool_file(pool_name)
        with self._pool_lock(pool_name):
            if path.exists():
                return None  # the same config applied again: nothing changes
            workers = [f"{pool_name}-{i}" for i in range(1, task["pool"]["workers"] + 1)]
            record = {"status": "READY", "labels": dict(task["resources"].get("labels") or {}), "resources": task["resources"], "workers": workers}
            path.write_text(json.dumps({**record, "status": "CONTROLLER_INIT"}))
            for worker in workers:
                self._provision(parsed, task, worker, {"autostop": None, "to_down": False, "pool": pool_name}, on_log)
            path.write_text(json.dumps(record))
        return None

    def pool_status(self, pool_names=None):
        self._record("pool_status", pools=pool_names)
        out = []
        for path in sorted((STATE / "pools").glob("*.json")) if (STATE / "pools").exists() else []:
            if pool_names and path.stem not in pool_names:
                continue
            rec = json.loads(path.read_text())
            out.append({"name": path.stem, "status": rec["status"], "labels": rec["labels"], "workers": len(rec["workers"]),
                        "target_workers": len(rec["workers"]), "resources": "1x AWS(m7i.large)"})
        return out

    def pool_down(self, pool_name):
        self._record("pool_down", pool=pool_name)
        path = self._pool_file(pool_name)
        if not path.exists():
            return
        with self._pool_lock(pool_name):
            for worker in json.loads(path.read_text())["workers"]:
                self.down(worker)
            path.unlink()

    def _pool_job(self, task, pool, job_id) -> None:
        path = self._pool_file(pool)
        if not path.exists():
            raise ValueError(f"Pool {pool!r} not found.")
        wanted = json.loads(path.read_text())["resources"]
        for field in ("setup", "workdir", "file_mounts"):
            if task.get(field):
                raise ValueError(f"a job on pool {pool!r} cannot have its own {field}: the pool's workers are set up already")
        if task["resources"] != wanted:
            raise ValueError(f"the job's resources {task['resources']} do not match pool {pool!r}'s {wanted}")
        (STATE / "jobs" / f"managed-{job_id}.pool").write_text(pool)
        # The job's envs and secrets wait with it until a worker takes it, readable by this user only.
        fd = os.open(STATE / "jobs" / f"managed-{job_id}.task", os.O_CREAT | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(task, fh)
        self._schedule(pool)

    def _pool_of(self, job_id):
        path = STATE / "jobs" / f"managed-{job_id}.pool"
        return path.read_text() if path.exists() else None

    def _placed(self, job_id) -> bool:
        return (STATE / "jobs" / f"managed-{job_id}.where").exists()

    def _pool_job_state(self, job_id):
        if self._placed(job_id):
            return None  # on a worker: the job's own state
        if (STATE / "jobs" / f"managed-{job_id}.cancelled").exists() or not self._pool_file(self._pool_of(job_id)).exists():
            return "CANCELLED"  # cancelled while waiting, or its pool went down under it
        return "PENDING"

    def _schedule(self, pool) -> bool:
        """Give waiting jobs the free workers, in order: one job per worker at a time. False: the pool is gone."""
        path = self._pool_file(pool)
        if not path.exists():
            return False
        with self._pool_lock(pool):
            if not path.exists():
                return False
            workers = json.loads(path.read_text())["workers"]
            busy = set()
            for where in (STATE / "jobs").glob("managed-*.where"):
                cluster, inner = where.read_text().split()
                if cluster in workers and self._state(cluster, inner) == "RUNNING":
                    busy.add(cluster)
            waiting = sorted(int(p.name.split("-")[1].split(".")[0]) for p in (STATE / "jobs").glob("managed-*.task")
                             if self._pool_of(int(p.name.split("-")[1].split(".")[0])) == pool)
            for job_id in waiting:
                free = [w for w in workers if w not in busy]
                if not free:
                    break
                task_path = STATE / "jobs" / f"managed-{job_id}.task"
                task = json.loads(task_path.read_text())
                inner = self._submit(free[0], task)
                (STATE / "jobs" / f"managed-{job_id}.where").write_text(f"{free[0]} {inner}")
                task_path.unlink()
                self._record("pool_job_start", pool=pool, job_id=job_id, worker=free[0], busy_before=sorted(busy))
                busy.add(free[0])
        return True

    def optimize(self, tasks, clouds=None):
        raise AssertionError("the backend never asks the stand-in to optimize")

    def check(self, clouds=None):
        """SkyPilot's credential check, as far as it can go with no cloud: AWS asks STS who the
        process's credentials are (moto answers at AWS_ENDPOINT_URL); other clouds are not enabled."""
        self._record("check", clouds=clouds)
        enabled = {}
        if not clouds or "aws" in clouds:
            import boto3

            try:
                boto3.Session().client("sts").get_caller_identity()
                enabled["aws"] = ["compute", "storage"]
            except Exception as exc:  # noqa: BLE001 - no or bad credentials: AWS is not enabled, as in `sky check`
                print(f"aws: {type(exc).__name__}", file=sys.stderr)
        return enabled


if __name__ == "__main__":
    assert sys.argv[1:] == ["--serve"], sys.argv
    sys.exit(serve(VMStandIn))

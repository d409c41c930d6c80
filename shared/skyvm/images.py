"""The image a node runs in: a base image plus skyvm and the user's requirements.

Built with the docker SDK from wheels made on the host and installed with
``pip install --no-index`` (so the build needs no index, offline and
reproducible), tagged by a hash of everything that goes in (an unchanged
build is skipped), and pushed to a registry when one is configured.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from skyvm import progress
from skyvm.errors import InfrastructureError
from skyvm.home import Home
from skyvm.settings import RegistrySettings

log = logging.getLogger("skyvm.images")

IMAGE_REPOSITORY = "skyvm-node"
# The node's venv; its bin comes first on PATH so `python3 -m skyvm.node` finds skyvm.
NODE_VENV = "/opt/skyvm"
# What every node image holds besides skyvm: the fsspec file systems of the cloud payload stores
# (s3://, gs://, az://; skyvm.payloads on the node side), and boto3. The lower bounds are the extras'
# (pyproject.toml): unbounded, pip meets boto3's newest botocore with s3fs 0.4, which cannot take an endpoint.
RUNTIME_REQUIREMENTS = ("boto3", "s3fs>=2024.6", "gcsfs>=2024.6", "adlfs>=2024.4")

DOCKERFILE = """\
FROM {base}
COPY wheels /tmp/skyvm-wheels
RUN python3 -m venv {venv} \\
 && {venv}/bin/pip install --no-index --no-cache-dir --find-links /tmp/skyvm-wheels {packages} \\
 && rm -rf /tmp/skyvm-wheels
ENV PATH={venv}/bin:$PATH PYTHONUNBUFFERED=1
LABEL dev.skyvm.image=node
"""

_build_lock = threading.Lock()


def default_base_image() -> str:
    """The official slim image of the host's Python minor version, unless SKYVM_BASE_IMAGE names another.

    The payload is cloudpickled, so the node's Python must match the host's.
    """
    return os.environ.get("SKYVM_BASE_IMAGE") or f"python:{sys.version_info.major}.{sys.version_info.minor}-slim"


def project_root() -> Optional[Path]:
    """The source checkout skyvm is imported from, if any (an editable install)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "shared" / "skyvm").is_dir() else None


def _tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    paths = [root / "pyproject.toml"] + sorted(
        p for d in ("shared", "adapters") for p in (root / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )
    for path in paths:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _pip(*args: str, cwd: Optional[Path] = None) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if out.returncode != 0:
        raise InfrastructureError(f"building wheels failed: {' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def build_wheels(requirements: Sequence[str] = (), cache: Optional[Path] = None) -> Path:
    """Wheels for skyvm, its runtime needs and the user's requirements, built on the host once per content."""
    import skyvm

    root = project_root()
    source = _tree_hash(root) if root else f"skyvm=={skyvm.__version__}"
    key = hashlib.sha256(json.dumps([source, sorted(requirements), list(RUNTIME_REQUIREMENTS)]).encode()).hexdigest()[:16]
    out = (cache or Home.current().wheels) / key
    if (out / ".complete").is_file():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=out.parent if out.parent.exists() else None))
    try:
        with progress.step("building wheels for the node image", logger=log):
            if root:
                _pip("wheel", "--no-deps", "-q", "-w", str(tmp), str(root))
                own = next(tmp.glob("skyvm-*.whl"))
                _pip("wheel", "-q", "-w", str(tmp), str(own), *RUNTIME_REQUIREMENTS, *requirements)
            else:
                _pip("wheel", "-q", "-w", str(tmp), f"skyvm=={skyvm.__version__}", *RUNTIME_REQUIREMENTS, *requirements)
        (tmp / ".complete").write_text(json.dumps(sorted(requirements)))
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():  # built meanwhile by another process
            return out
        tmp.rename(out)
        return out
    finally:
        if tmp.exists():
            subprocess.run(["rm", "-rf", str(tmp)], check=False)


def _package_names(requirements: Sequence[str]) -> list[str]:
    return ["skyvm", *RUNTIME_REQUIREMENTS, *requirements]


@dataclass(frozen=True)
class BuiltImage:
    ref: str  # what a node runs: tag, with the registry prefix when pushed
    content_hash: str
    built: bool  # False when an identical image existed already
    pushed: bool


# Every Docker Engine API call waits at most this long for an answer (the SDK's read timeout);
# streams (builds, pulls, a node's log) wait this long between two chunks, not in total.
DOCKER_CALL_TIMEOUT_S = float(os.environ.get("SKYVM_DOCKER_CALL_TIMEOUT_S", "120"))


def docker_client():
    try:
        import docker
    except ImportError:  # pragma: no cover - depends on the install
        raise InfrastructureError("building node images needs the docker SDK: pip install 'skyvm[docker]'") from None
    try:
        client = docker.from_env(timeout=DOCKER_CALL_TIMEOUT_S)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any connection problem means the same to the user
        raise InfrastructureError(f"no Docker engine reachable ({exc}); start dockerd, or set DOCKER_HOST") from None
    return client


def _context_tar(dockerfile: str, wheels: Path) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = dockerfile.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for whl in sorted(wheels.glob("*.whl")):
            tar.add(str(whl), arcname=f"wheels/{whl.name}")
    buf.seek(0)
    return buf


def registry_auth(registry: Optional[RegistrySettings], login: Optional[tuple[str, str]]) -> Optional[dict]:
    if registry is None or login is None:
        return None
    return {"username": login[0], "password": login[1], "serveraddress": registry.server}


def build_node_image(
    *,
    base: Optional[str] = None,
    requirements: Sequence[str] = (),
    registry: Optional[RegistrySettings] = None,
    push: bool = True,
    client=None,
    login: Optional[tuple[str, str]] = None,
) -> BuiltImage:
    """``login`` is (username, password or token) for ``registry``; by default its password reference."""
    """Build (or reuse) the node image for these requirements and push it to ``registry``."""
    client = client or docker_client()
    base = base or default_base_image()
    try:
        base_id = client.images.get(base).id
    except Exception:  # noqa: BLE001
        try:
            base_id = pull_image(client, base)
        except Exception as exc:  # noqa: BLE001
            raise InfrastructureError(
                f"base image {base!r} is neither present nor pullable ({exc}); set SKYVM_BASE_IMAGE to an image with python3 and venv "
                f"(./dev makes one from Debian packages)"
            ) from None
    with _build_lock:
        wheels = build_wheels(requirements)
        dockerfile = DOCKERFILE.format(base=base, venv=NODE_VENV, packages=" ".join(shlex.quote(p) for p in _package_names(requirements)))
        digest = hashlib.sha256(base_id.encode() + dockerfile.encode())
        for whl in sorted(wheels.glob("*.whl")):
            digest.update(whl.name.encode() + hashlib.sha256(whl.read_bytes()).digest())
        content_hash = digest.hexdigest()[:20]
        local_tag = f"{IMAGE_REPOSITORY}:{content_hash}"
        ref = f"{registry.server.rstrip('/')}/{local_tag}" if registry else local_tag
        built = False
        try:
            client.images.get(local_tag)
        except Exception:  # noqa: BLE001 - absent: build it
            _build(client, dockerfile, wheels, local_tag, base)
            built = True
        pushed = False
        if registry and push:
            image = client.images.get(local_tag)
            image.tag(f"{registry.server.rstrip('/')}/{IMAGE_REPOSITORY}", tag=content_hash)
            if login is None and registry.username and registry.password_reference():
                from skyvm.connectors import refs

                login = (registry.username, refs.resolve(registry.password_reference(), f"registry {registry.server}: password"))
            push_image(client, ref, registry, login)
            pushed = True
        return BuiltImage(ref=ref, content_hash=content_hash, built=built, pushed=pushed)


# "Step 3/6 : RUN python3 -m venv ...": the classic builder's line at the start of each layer.
_BUILD_STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)")


def _build(client, dockerfile: str, wheels: Path, tag: str, base: str) -> None:
    """Build the node image, its progress layer by layer from the build stream."""
    logs: list[str] = []
    with progress.step(f"building node image {tag} from {base}", logger=log) as shown:
        try:
            chunks = client.api.build(
                fileobj=_context_tar(dockerfile, wheels), custom_context=True, tag=tag, network_mode="host", rm=True, forcerm=True, pull=False, decode=True
            )
            for chunk in chunks:
                text = chunk.get("stream", "")
                logs.append(text)
                layer = _BUILD_STEP.match(text)
                if layer:
                    shown.update(f"step {layer[1]}/{layer[2]}: {layer[3][:60]}", completed=int(layer[1]) - 1, total=int(layer[2]))
                if "error" in chunk:
                    raise InfrastructureError(f"building node image {tag} failed: {chunk['error']}\n{''.join(logs)[-4000:]}")
            client.images.get(tag)
        except InfrastructureError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise InfrastructureError(f"building node image {tag} failed: {exc}\n{''.join(logs)[-4000:]}") from None


def follow_layers(shown: progress.Step, chunks) -> list[str]:
    """Show a push's or pull's bytes, summed over its layers, from Docker's stream; return its errors."""
    layers: dict[str, tuple[int, int]] = {}
    errors = []
    for chunk in chunks:
        if "error" in chunk:
            errors.append(chunk["error"])
        detail = chunk.get("progressDetail") or {}
        if chunk.get("id") and detail.get("total"):
            # A push's "current" may pass its "total" (Docker counts them apart): never more than all.
            layers[chunk["id"]] = (min(detail.get("current", 0), detail["total"]), detail["total"])
            shown.update(f"{len(layers)} layer(s)", completed=sum(c for c, _ in layers.values()), total=sum(t for _, t in layers.values()))
    return errors


def pull_image(client, ref: str, auth_config: Optional[dict] = None) -> str:
    """Pull ``ref`` (with ``registry_auth``'s login, if any), with progress; its image id."""
    from docker.utils import parse_repository_tag

    repo, tag = parse_repository_tag(ref)
    with progress.step(f"pulling {ref}", logger=log, unit="bytes") as shown:
        try:
            errors = follow_layers(shown, client.api.pull(repo, tag=tag or "latest", auth_config=auth_config, stream=True, decode=True))
        except Exception as exc:  # noqa: BLE001 - the engine's refusal, said with what was pulled
            raise InfrastructureError(f"pulling {ref} failed: {exc}") from None
    if errors:
        raise InfrastructureError(f"pulling {ref} failed: {'; '.join(errors)}")
    return client.images.get(ref).id


def push_image(client, ref: str, registry: RegistrySettings, login: Optional[tuple[str, str]] = None) -> None:
    repo, _, tag = ref.rpartition(":")
    with progress.step(f"pushing {ref}", logger=log, unit="bytes") as shown:
        errors = follow_layers(shown, client.api.push(repo, tag=tag, auth_config=registry_auth(registry, login), stream=True, decode=True))
    if errors:
        raise InfrastructureError(f"pushing {ref} to {registry.server} failed: {'; '.join(errors)}")

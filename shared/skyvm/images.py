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


# ./dev's node bases (``./dev base X.Y``): skyvm-base:pyX.Y-<Debian suite>, labelled with their Python's minor version.
BASE_REPOSITORY = "skyvm-base"
PYTHON_LABEL = "dev.skyvm.python"
_PYTHON_PROBE = ["python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]
# image id -> its python3's minor version: asked once per image (a label, else a container that prints it).
_base_pythons: dict[str, str] = {}
# $SKYVM_BASE_IMAGE values ("" for none) whose base passed check_launcher_base in this process.
_checked_bases: set[str] = set()


def launcher_python() -> str:
    """This process's Python minor version ("3.13"): a node's must be the same (payloads are cloudpickled)."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _local_bases(client) -> list[str]:
    return sorted(tag for image in client.images.list(name=BASE_REPOSITORY) for tag in image.tags)


def default_base_image(client=None) -> str:
    """The base of the node image: ``$SKYVM_BASE_IMAGE``, else a local skyvm-base:pyX.Y-* of this launcher's
    Python minor version (``./dev base X.Y`` makes one), else the official ``python:X.Y-slim``."""
    if os.environ.get("SKYVM_BASE_IMAGE"):
        return os.environ["SKYVM_BASE_IMAGE"]
    minor = launcher_python()
    try:
        local = [tag for tag in _local_bases(client or docker_client()) if tag.startswith(f"{BASE_REPOSITORY}:py{minor}-")]
    except InfrastructureError:  # no engine here: the official image's name, for a build elsewhere
        local = []
    return local[0] if local else f"python:{minor}-slim"


def base_python(client, image) -> str:
    """The Python minor version of ``image`` (a docker SDK Image): its label, else its python3's answer, once per image id."""
    if image.id not in _base_pythons:
        label = (image.labels or {}).get(PYTHON_LABEL)
        if label:
            _base_pythons[image.id] = label
        else:
            try:
                out = client.containers.run(image.id, _PYTHON_PROBE, remove=True, network_mode="none", stderr=True)
            except Exception as exc:  # noqa: BLE001 - no python3 is as bad as a wrong one
                raise InfrastructureError(f"base image {image.tags[0] if image.tags else image.id}: `python3` does not run in it ({exc}); a base needs python3 with venv") from None
            _base_pythons[image.id] = out.decode().strip()
    return _base_pythons[image.id]


def _fix(minor: str) -> str:
    return f"make a base for Python {minor} with `./dev base {minor}`, or set SKYVM_BASE_IMAGE to an image whose python3 is {minor}"


def require_launcher_python(client, base: str, image) -> None:
    """Refuse ``base`` (its docker SDK Image) when its Python is not this launcher's minor version."""
    got, want = base_python(client, image), launcher_python()
    if got != want:
        raise InfrastructureError(
            f"base image {base!r} has Python {got}, but this launcher runs Python {want}: a node's payload is cloudpickled and "
            f"needs the same minor version; {_fix(want)}"
        )


def check_launcher_base() -> None:
    """At submit: refuse, naming both versions and the fix, a default base that cannot serve this launcher's Python.

    A base that is absent but served by a registry passes (the build pulls it and checks it then);
    without a Docker engine nothing is checked here (the build says so). A base that passed is not
    asked again in this process (per ``$SKYVM_BASE_IMAGE``): the build checks the one it uses anyway.
    """
    key = os.environ.get("SKYVM_BASE_IMAGE", "")
    if key in _checked_bases:
        return
    try:
        client = docker_client()
    except InfrastructureError:
        return
    try:
        base = default_base_image(client)
        try:
            image = client.images.get(base)
        except Exception:  # noqa: BLE001 - absent: a registry may serve it
            try:
                client.images.get_registry_data(base)
            except Exception as exc:  # noqa: BLE001
                others = ", ".join(_local_bases(client)) or "none"
                raise InfrastructureError(
                    f"no base image for this launcher's Python {launcher_python()}: {base!r} is neither present nor pullable ({exc}); "
                    f"the local bases are: {others}; {_fix(launcher_python())}"
                ) from None
        else:
            require_launcher_python(client, base, image)
    finally:
        client.close()
    _checked_bases.add(key)


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
    # The launcher's Python is in the key: compiled wheels (aiohttp's, for one) serve one minor version only.
    key = hashlib.sha256(json.dumps([source, sorted(requirements), list(RUNTIME_REQUIREMENTS), launcher_python()]).encode()).hexdigest()[:16]
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
    chosen = base is None  # the launcher's own base: its Python must be the launcher's (an explicit one is the caller's)
    base = base or default_base_image(client)
    try:
        base_id = client.images.get(base).id
    except Exception:  # noqa: BLE001
        try:
            base_id = pull_image(client, base)
        except Exception as exc:  # noqa: BLE001
            raise InfrastructureError(
                f"base image {base!r} is neither present nor pullable ({exc}); {_fix(launcher_python())} (with venv)"
            ) from None
    if chosen:
        require_launcher_python(client, base, client.images.get(base_id))
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

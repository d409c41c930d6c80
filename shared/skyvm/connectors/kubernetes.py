"""Kubernetes: the ambient kubeconfig (``implicit``: KUBECONFIG, else ~/.kube/config) or one given (``kubeconfig``).

``kubeconfig`` is a reference to the YAML itself (``file:PATH``, ``env:NAME``,
``airflow:CONN_ID``...); ``context`` picks one of its contexts (default: its
current-context). SkyPilot is given the kubeconfig as ``KUBECONFIG`` (a 0600
copy in a private directory, never ~/.kube) and the context through its own
setting: ``infra: k8s/CONTEXT`` in the task, or ``kubernetes.allowed_contexts``
in SkyPilot's config; skyvm does not change the file's current-context.

The two methods are strategies here: each says where the kubeconfig comes from and what SkyPilot is given.

May import: pyyaml and kubernetes (through ``require``), skyvm.redact and skyvm.connectors' base,
common, refs and files.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import Field

from skyvm import redact
from skyvm.connectors import refs
from skyvm.connectors.base import Connector, ConnectorError, Method, Needs, require
from skyvm.connectors.common import sdk_call
from skyvm.connectors.files import write_private

# Fields of a kubeconfig that hold secrets, per user entry.
_USER_SECRETS = ("token", "client-key-data", "password")
_AUTH_PROVIDER_SECRETS = ("access-token", "refresh-token", "client-secret", "id-token")
# Fields that name files, relative to the kubeconfig's own folder.
_PATH_FIELDS = {"clusters": ("cluster", ("certificate-authority",)), "users": ("user", ("client-certificate", "client-key", "tokenFile"))}
VERSION_TIMEOUT_S = 5


def _named(config: dict[str, Any], section: str) -> dict[str, dict[str, Any]]:
    return {entry.get("name"): entry for entry in config.get(section) or [] if isinstance(entry, dict)}


def merge(configs: list[dict[str, Any]]) -> dict[str, Any]:
    """KUBECONFIG's rule: the first file to name an entry (or current-context) wins."""
    merged: dict[str, Any] = {"apiVersion": "v1", "kind": "Config", "clusters": [], "contexts": [], "users": []}
    for config in configs:
        if not merged.get("current-context") and config.get("current-context"):
            merged["current-context"] = config["current-context"]
        for section in ("clusters", "contexts", "users"):
            known = {e.get("name") for e in merged[section]}
            merged[section] += [e for e in config.get(section) or [] if isinstance(e, dict) and e.get("name") not in known]
    return merged


def absolutize(config: dict[str, Any], base: Path) -> dict[str, Any]:
    """File paths in the config made absolute against ``base`` (its copy lives elsewhere)."""
    for section, (inner, fields) in _PATH_FIELDS.items():
        for entry in config.get(section) or []:
            body = entry.get(inner) if isinstance(entry, dict) else None
            for name in fields:
                if isinstance(body, dict) and isinstance(body.get(name), str) and not os.path.isabs(os.path.expanduser(body[name])):
                    body[name] = str(base / body[name])
    return config


def register_secrets(config: dict[str, Any]) -> None:
    for entry in config.get("users") or []:
        user = entry.get("user") if isinstance(entry, dict) else None
        if isinstance(user, dict):
            redact.register(*(user.get(k) for k in _USER_SECRETS))
            provider = (user.get("auth-provider") or {}).get("config") or {}
            redact.register(*(provider.get(k) for k in _AUTH_PROVIDER_SECRETS))


class Implicit(Method):
    """KUBECONFIG, else ~/.kube/config, merged as kubectl does."""

    method: Literal["implicit"] = "implicit"

    def load(self, conn: "KubernetesConnector") -> tuple[dict[str, Any], str]:
        paths = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p] or [os.path.join(os.path.expanduser("~"), ".kube", "config")]
        configs = []
        for path in paths:
            try:
                text = Path(path).read_text()
            except OSError:
                continue  # kubectl skips KUBECONFIG entries that do not exist
            configs.append(absolutize(conn.parse(text, path), Path(path).resolve().parent))
        if not configs:
            raise ConnectorError(
                f"{conn.label}: no kubeconfig at {os.pathsep.join(paths)}; set KUBECONFIG, or define a connector with method kubeconfig and kubeconfig: file:PATH"
            )
        return merge(configs), os.pathsep.join(paths)



class Kubeconfig(Method):
    """A kubeconfig behind a reference, given to SkyPilot as a private copy."""

    method: Literal["kubeconfig"] = "kubeconfig"

    kubeconfig: refs.Reference = None


    NEEDS: ClassVar[Needs] = ((("kubeconfig",), "kubeconfig (a reference to the kubeconfig YAML, e.g. file:/secrets/kubeconfig or env:KUBECONFIG_YAML)"),)

    def load(self, conn: "KubernetesConnector") -> tuple[dict[str, Any], str]:
        text = refs.resolve(self.kubeconfig, f"{conn.where}.kubeconfig")
        config = conn.parse(text, f"kubeconfig {self.kubeconfig!r}")
        scheme, _, rest = self.kubeconfig.partition(":")
        if scheme == "file":
            absolutize(config, Path(rest).expanduser().resolve().parent)
        return config, f"kubeconfig {self.kubeconfig!r}"

    def skypilot_env(self, conn: "KubernetesConnector", private_dir: Path) -> dict[str, str]:
        yaml = require("yaml", "kubernetes", conn.label)
        config, source = self.load(conn)
        conn.chosen(config, source)  # a wrong context fails here, not in SkyPilot
        path = write_private(Path(private_dir) / "kubeconfig", yaml.safe_dump(config, sort_keys=False))
        return {"KUBECONFIG": str(path)}


class KubernetesConnector(Connector):
    """A Kubernetes cluster, through a kubeconfig and one of its contexts."""

    type: str = "kubernetes"
    auth: Annotated[Union[Implicit, Kubeconfig], Field(discriminator="method")]

    context: Optional[str] = None

    def parse(self, text: str, source: str) -> dict[str, Any]:
        yaml = require("yaml", "kubernetes", self.label)
        try:
            config = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConnectorError(f"{self.label}: {source} is not YAML ({redact.redact(str(exc).splitlines()[0])}); point kubeconfig at a kubeconfig file") from None
        if not isinstance(config, dict) or not isinstance(config.get("contexts", []), list):
            raise ConnectorError(f"{self.label}: {source} is not a kubeconfig (no contexts list); point kubeconfig at a kubeconfig file")
        register_secrets(config)
        return config

    def load(self) -> tuple[dict[str, Any], str]:
        """The kubeconfig (file paths made absolute) and where it came from."""
        return self.auth.load(self)

    def chosen(self, config: dict[str, Any], source: str) -> tuple[str, dict[str, Any]]:
        """(context name, its cluster entry) or an error naming the contexts there are."""
        contexts = _named(config, "contexts")
        listed = ", ".join(sorted(str(n) for n in contexts)) or "none"
        name = self.context or config.get("current-context")
        if not name:
            raise ConnectorError(f"{self.label}: {source} has no current-context; set context: to one of its contexts: {listed}")
        if name not in contexts:
            raise ConnectorError(f"{self.label}: context {name!r} is not in {source}; its contexts: {listed}")
        cluster_name = (contexts[name].get("context") or {}).get("cluster")
        cluster = _named(config, "clusters").get(cluster_name)
        if cluster is None:
            raise ConnectorError(f"{self.label}: context {name!r} names cluster {cluster_name!r}, which {source} does not define")
        return name, cluster

    def identity(self) -> str:
        config, source = self.load()
        name, cluster = self.chosen(config, source)
        server = (cluster.get("cluster") or {}).get("server", "an unknown server")
        said = f"context {name} at server {server}"
        if importlib.util.find_spec("kubernetes") is not None:
            said += f" (Kubernetes {self._version(config, name)})"
        return said

    def _version(self, config: dict[str, Any], context: str) -> str:
        """The API server's version, with the official client when it is installed (optional)."""
        k8s_config = require("kubernetes.config", "kubernetes", self.label)
        k8s_client = require("kubernetes.client", "kubernetes", self.label)
        hint = "check that the cluster is up and reachable from here, and the context's credentials"
        api = sdk_call(self.label, f"loading context {context}", hint, k8s_config.new_client_from_config_dict, config, context=context)
        info = sdk_call(self.label, f"asking the API server of context {context} its version", hint, k8s_client.VersionApi(api).get_code, _request_timeout=VERSION_TIMEOUT_S)
        return str(info.git_version)

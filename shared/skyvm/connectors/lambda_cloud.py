"""Lambda Cloud: an API key (``api-key``), or the one SkyPilot reads itself (``implicit``).

SkyPilot reads Lambda's key only from ``~/.lambda_cloud/lambda_keys`` (a line
``api_key = KEY``), with no variable to point it elsewhere. skyvm never writes
into the user's home: ``skypilot_env`` writes the file under a private
directory (``PRIVATE/home/.lambda_cloud/lambda_keys``, mode 0600) and returns
``HOME`` pointing at ``PRIVATE/home``. The trade-off: HOME is the SkyPilot
process's for everything, not only Lambda. So that SkyPilot still finds its
state (``~/.sky``), its SSH keys (``~/.ssh/sky-key``) and other clouds' files,
every other entry of the real home is linked into the private one (links in
the private directory: the real home is not changed). What SkyPilot would
create anew at the top of HOME (a first ``~/.sky``) lands in the private home
and goes with it. The caller decides whether to apply the variable.

The two methods are strategies here: each says where the key comes from and what SkyPilot is given.

May import: skyvm.redact and skyvm.connectors' base, common, refs and files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, field_validator

from skyvm import redact
from skyvm.connectors import refs
from skyvm.connectors.base import Connector, ConnectorError, Method, Needs
from skyvm.connectors.common import http_json
from skyvm.connectors.files import write_private

API_BASE = "https://cloud.lambdalabs.com/api/v1"
KEYS_FILE = Path(".lambda_cloud") / "lambda_keys"


def read_keys_file(path: Path) -> dict[str, str]:
    """``key = value`` lines, the way SkyPilot's lambda_utils reads them."""
    pairs = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.strip().partition(" = ")
        if sep:
            pairs[key] = value
    return pairs


class Implicit(Method):
    """The key SkyPilot reads itself, from ~/.lambda_cloud/lambda_keys (read, never written)."""

    method: Literal["implicit"] = "implicit"

    def key(self, conn: "LambdaConnector") -> str:
        path = Path(os.path.expanduser("~")) / KEYS_FILE
        try:
            value = read_keys_file(path).get("api_key", "")
        except OSError as exc:
            raise ConnectorError(
                f"{conn.label}: cannot read {path} ({exc.strerror or exc}), where SkyPilot reads Lambda's key; "
                "write `api_key = KEY` there, or define a connector with method api-key and api_key: env:LAMBDA_API_KEY"
            ) from None
        if not value:
            raise ConnectorError(f"{conn.label}: {path} has no `api_key = KEY` line")
        redact.register(value)
        return value



class ApiKey(Method):
    """A key behind a reference, given to SkyPilot in a private home (see the module's docstring)."""

    method: Literal["api-key"] = "api-key"

    api_key: refs.Reference = None


    NEEDS: ClassVar[Needs] = ((("api_key",), "api_key (a reference, e.g. env:LAMBDA_API_KEY)"),)

    def key(self, conn: "LambdaConnector") -> str:
        value = refs.resolve(self.api_key, f"{conn.where}.api_key").strip()
        if not value:
            raise ConnectorError(f"{conn.label}: api_key {self.api_key!r} resolves to an empty value; put the key from Lambda's dashboard (API keys) there")
        return value

    def skypilot_env(self, conn: "LambdaConnector", private_dir: Path) -> dict[str, str]:
        home = Path(private_dir) / "home"
        for folder in (home, home / KEYS_FILE.parent):
            folder.mkdir(mode=0o700, exist_ok=True)
        write_private(home / KEYS_FILE, f"api_key = {self.key(conn)}\n")
        real = Path(os.path.expanduser("~"))
        if real.is_dir() and real.resolve() != home.resolve():
            for entry in real.iterdir():
                link = home / entry.name
                if entry.name != KEYS_FILE.parts[0] and not link.exists() and not link.is_symlink():
                    link.symlink_to(entry)
        return {"HOME": str(home)}


class LambdaConnector(Connector):
    """A Lambda Cloud account."""

    type: str = "lambda"
    auth: Annotated[Union[Implicit, ApiKey], Field(discriminator="method")]

    # Lambda's API (for `skyvm check`); SkyPilot itself always uses Lambda's own.
    api_base: str = API_BASE

    @field_validator("api_base")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError(f"api_base is a URL (default {API_BASE}); got {value!r}")
        return value.rstrip("/")

    def key(self) -> str:
        """The API key: the reference's value, or the one in ~/.lambda_cloud/lambda_keys (read, never written)."""
        return self.auth.key(self)

    def identity(self) -> str:
        answer = http_json(
            f"{self.api_base}/instance-types",
            label=self.label,
            what="listing Lambda instance types",
            hint="the API key was refused: create a new one in Lambda's dashboard (API keys)",
            headers={"Authorization": f"Bearer {self.key()}"},
        )
        kinds = answer.get("data") or {}
        return f"Lambda Cloud API key accepted at {self.api_base} ({len(kinds)} instance types offered)"

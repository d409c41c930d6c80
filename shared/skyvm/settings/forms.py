"""The accepted forms of single settings values, and the names they are checked against.

Holds: the accepted names (clouds, backends, disk tiers, recovery strategies, store prefixes,
Lambda Cloud's unsupported fields) and one check per value form (quantities, accelerators,
job recovery, infra, ports, names). Each check returns the value as the model keeps it, or
raises ``ValueError`` with the text a user sees: what was given and what is accepted.

May import: :mod:`skyvm.validation` (``suggest``) and :mod:`skyvm.clouds` (the clouds and store
prefixes, re-exported here); no pydantic model, no other part of skyvm.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Union

from skyvm.clouds import CLOUDS, STORE_PREFIXES
from skyvm.clouds import INFRA_NAMES as INFRA_CLOUDS  # infra prefixes SkyPilot accepts, mapped to the cloud they mean
from skyvm.validation import suggest

DISK_TIERS = ("low", "medium", "high", "ultra", "best")
RECOVERY_STRATEGIES = ("FAILOVER", "EAGER_NEXT_REGION", "NONE")
BACKENDS = ("local", "skypilot")

# Lambda Cloud has no spot market, no custom images, no zones, fixed disks and
# no autostop: SkyPilot would refuse these only at launch time.
LAMBDA_UNSUPPORTED = ("use_spot", "spot_fallback", "job_recovery", "image_id", "zone", "disk_size", "disk_tier", "idle_minutes_to_autostop", "autostop")

_QUANTITY = re.compile(r"^\d+(\.\d+)?\+?$")
_ACCEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*(:\d+(\.\d+)?)?$")
_CLUSTER_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def quantity(value: Any, what: str) -> Optional[str]:
    """cpus / memory: a positive number, or a string like '2' or '2+' (at least 2)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number or a string like '2' or '2+', not a boolean")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"{what} must be positive, got {value}")
        return f"{value:g}"
    if isinstance(value, str) and _QUANTITY.match(value.strip()):
        text = value.strip()
        if float(text.rstrip("+")) <= 0:
            raise ValueError(f"{what} must be positive, got {value!r}")
        return text
    raise ValueError(f"{what} accepts a positive number or a string like '2' or '2+' (meaning at least 2); got {value!r}")


def cluster_name(value: Optional[str], field: str) -> Optional[str]:
    if value is not None and not _CLUSTER_NAME.match(value):
        raise ValueError(
            f"{field} must be 1-63 characters of lowercase letters, digits and '-', "
            f"starting with a letter and not ending with '-' (valid on every cloud); got {value!r}"
        )
    return value


def accelerators(value: Any) -> Any:
    """'NAME', 'NAME:COUNT' or {NAME: COUNT}."""
    if value is None:
        return None
    if isinstance(value, str):
        if not _ACCEL.match(value.strip()):
            raise ValueError(f"accelerators accepts 'NAME', 'NAME:COUNT' or {{NAME: COUNT}} (e.g. 'V100', 'V100:2'); got {value!r}")
        name, _, count = value.strip().partition(":")
        if count and float(count) <= 0:
            raise ValueError(f"accelerator count must be positive; got {value!r}")
        return value.strip()
    if isinstance(value, Mapping):
        if len(value) != 1:
            raise ValueError(f"accelerators as a mapping takes exactly one NAME: COUNT entry; got {dict(value)!r}")
        ((name, count),) = value.items()
        if isinstance(count, bool) or not isinstance(count, (int, float)) or count <= 0:
            raise ValueError(f"accelerator count must be a positive number; got {count!r} for {name!r}")
        return {str(name): int(count) if float(count).is_integer() else count}
    raise ValueError(f"accelerators accepts 'NAME', 'NAME:COUNT' or {{NAME: COUNT}}; got {value!r}")


def job_recovery(value: Any) -> Any:
    """A strategy name (any case) or {strategy, max_restarts_on_errors, recover_on_exit_codes}."""
    if value is None:
        return None
    allowed = ", ".join(RECOVERY_STRATEGIES)
    if isinstance(value, str):
        if value.upper() not in RECOVERY_STRATEGIES:
            raise ValueError(f"job_recovery strategy must be one of {allowed} (any case); got {value!r}{suggest(value.upper(), RECOVERY_STRATEGIES)}")
        return value
    if isinstance(value, Mapping):
        extra = set(value) - {"strategy", "max_restarts_on_errors", "recover_on_exit_codes"}
        if extra:
            raise ValueError(f"job_recovery accepts keys strategy, max_restarts_on_errors, recover_on_exit_codes; unknown: {sorted(extra)}")
        strategy = value.get("strategy")
        if strategy is not None and str(strategy).upper() not in RECOVERY_STRATEGIES:
            raise ValueError(f"job_recovery.strategy must be one of {allowed}; got {strategy!r}{suggest(str(strategy).upper(), RECOVERY_STRATEGIES)}")
        restarts = value.get("max_restarts_on_errors")
        if restarts is not None and (not isinstance(restarts, int) or restarts < 0):
            raise ValueError(f"job_recovery.max_restarts_on_errors must be a non-negative integer; got {restarts!r}")
        return dict(value)
    raise ValueError(f"job_recovery accepts a strategy name ({allowed}) or a mapping; got {value!r}")


def infra(value: Optional[str]) -> Optional[str]:
    """CLOUD[/REGION[/ZONE]] or k8s/CONTEXT."""
    if value is None:
        return None
    parts = value.split("/")
    if parts[0].lower() not in INFRA_CLOUDS or any(not p for p in parts) or len(parts) > 3:
        raise ValueError(
            "infra accepts CLOUD[/REGION[/ZONE]] (e.g. 'aws/us-east-1') or 'k8s/CONTEXT', "
            f"with CLOUD one of {', '.join(sorted(INFRA_CLOUDS))}; got {value!r}{suggest(parts[0].lower(), INFRA_CLOUDS)}"
        )
    return value


def infra_cloud(value: str) -> str:
    """The cloud an (already checked) infra string names."""
    return INFRA_CLOUDS[value.split("/")[0].lower()]


def ports(value: Any) -> Any:
    """Port numbers and ranges like '8000-8010'; one port alone is a list of one."""
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    out: list[Union[int, str]] = []
    for item in items:
        text = str(item)
        lo, _, hi = text.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or not (0 < int(lo) < 65536) or (hi and not int(lo) <= int(hi) < 65536):
            raise ValueError(f"ports accepts port numbers (1-65535) or ranges like '8000-8010'; got {item!r}")
        out.append(int(text) if not hi else text)
    return out


def env_names(value: dict[str, str]) -> dict[str, str]:
    for name in value:
        if not _ENV_NAME.match(name):
            raise ValueError(f"{name!r} is not a valid environment variable name (letters, digits, '_', not starting with a digit)")
    return value


def string_map(value: Any) -> Any:
    """envs / secrets / labels: keys and values as strings (YAML reads 1 and true as numbers and booleans)."""
    if isinstance(value, Mapping):
        return {str(k): ("" if v is None else str(v)) for k, v in value.items()}
    return value


def payload_store(value: Optional[str]) -> Optional[str]:
    if value is not None and "://" in value and not value.startswith(STORE_PREFIXES):
        raise ValueError(
            "payload_store accepts a directory path, file://PATH, s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX] "
            f"or az://CONTAINER[/PREFIX]; got {value!r}"
        )
    return value


def connector_names(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"connector takes a connector name or a list of names (one per cloud); got {value!r}")

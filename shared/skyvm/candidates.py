"""The settings SkyPilot has and skyvm hands on: resource candidates (``any_of``, ``ordered``,
``spot_fallback``), SkyPilot's rich ``autostop`` form and the ``skypilot:`` pass-through.

Their forms are checked here, when settings are validated, so a mistake names the file, the
layer and the field before any VM is asked for. No ``sky`` import at module level: the core and
engine environments have none (the pass-through is checked against SkyPilot's own schema only
where SkyPilot imports).

Holds the checks of those forms (``FieldError`` names the field). May import: the standard library
(and ``sky``, lazily, for the pass-through's schema).
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping, Optional


class FieldError(ValueError):
    """A whole-node check that found one field wrong: ``field`` (a dotted path inside the node)
    lets the error name it, and the layer of the settings file that set it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# What a candidate may set: where the VM is and what it has. The rest (image, envs, cluster life) is the node's.
# Not image_id or labels: the node's container image and skyvm's labels are the same on every candidate.
CANDIDATE_FIELDS = (
    "cloud", "infra", "region", "zone", "instance_type", "cpus", "memory", "accelerators", "accelerator_args",
    "use_spot", "job_recovery", "disk_size", "disk_tier", "network_tier", "ports",
)
LOCATION_FIELDS = ("cloud", "infra", "region", "zone")
CANDIDATE_LISTS = ("any_of", "ordered")

AUTOSTOP_KEYS = ("idle_minutes", "down", "wait_for", "hook", "hook_timeout")
AUTOSTOP_WAIT_FOR = ("jobs_and_ssh", "jobs", "none")

PASS_THROUGH_SECTIONS = ("resources", "task", "launch")
# Pass-through keys skyvm itself sets (or models as a field): giving them there would silently fight skyvm.
_MODELLED = {
    "resources": {
        **{f: f for f in CANDIDATE_FIELDS},
        "any_of": "any_of", "ordered": "ordered", "autostop": "autostop", "max_hourly_cost": "max_hourly_cost",
    },
    "task": {
        "name": "the node's name", "run": "the node's payload", "setup": "the node's image", "envs": "envs",
        "secrets": "secrets", "resources": "skypilot.resources", "num_nodes": "num_nodes", "workdir": "workdir",
        "file_mounts": "file_mounts", "config": "docker_run_args",
    },
    "launch": {
        "task": "the node", "cluster_name": "cluster_name", "idle_minutes_to_autostop": "idle_minutes_to_autostop or autostop",
        "down": "down or autostop", "retry_until_up": "retry_until_up", "dryrun": "(not for nodes)", "wait_for": "autostop.wait_for",
    },
}


def suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_candidates(value: Any, field: str) -> Optional[list[dict[str, Any]]]:
    """``any_of`` / ``ordered``: a non-empty list of mappings of resource fields."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{field} accepts a non-empty list of resource mappings (e.g. [{{accelerators: A100, use_spot: true}}, {{accelerators: H100}}]); got {value!r}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or not item:
            raise FieldError(f"{field}.{i}", f"each candidate is a non-empty mapping of resource fields ({', '.join(CANDIDATE_FIELDS)}); got {item!r}")
        for key in item:
            if key not in CANDIDATE_FIELDS:
                raise FieldError(
                    f"{field}.{i}.{key}",
                    f"not a resource field a candidate may set{suggest(key, CANDIDATE_FIELDS)}; accepted: {', '.join(CANDIDATE_FIELDS)}",
                )
        out.append(dict(item))
    return out


def check_autostop(value: Any) -> Any:
    """SkyPilot's forms: false (never), a number of idle minutes, or a mapping of AUTOSTOP_KEYS."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"autostop as a number is idle minutes, 0 or more; got {value!r}")
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"autostop accepts false, idle minutes (a whole number) or a mapping with {', '.join(AUTOSTOP_KEYS)}; got {value!r}")
    for key, item in value.items():
        if key not in AUTOSTOP_KEYS:
            raise FieldError(f"autostop.{key}", f"unknown autostop key{suggest(key, AUTOSTOP_KEYS)}; accepted: {', '.join(AUTOSTOP_KEYS)}")
        if key == "idle_minutes" and (isinstance(item, bool) or not isinstance(item, int) or item < 0):
            raise FieldError("autostop.idle_minutes", f"a whole number of minutes, 0 or more; got {item!r}")
        if key == "hook_timeout" and (isinstance(item, bool) or not isinstance(item, int) or item < 1):
            raise FieldError("autostop.hook_timeout", f"a whole number of seconds, 1 or more; got {item!r}")
        if key == "down" and not isinstance(item, bool):
            raise FieldError("autostop.down", f"true or false; got {item!r}")
        if key == "hook" and not isinstance(item, str):
            raise FieldError("autostop.hook", f"a shell command run before the cluster stops; got {item!r}")
        if key == "wait_for" and str(item).lower() not in AUTOSTOP_WAIT_FOR:
            raise FieldError("autostop.wait_for", f"got {item!r}{suggest(str(item).lower(), AUTOSTOP_WAIT_FOR)}; accepted: {', '.join(AUTOSTOP_WAIT_FOR)}")
    return dict(value)


def check_pass_through(value: Any) -> dict[str, dict[str, Any]]:
    """``skypilot: {resources, task, launch}``: keys skyvm does not model, checked against
    SkyPilot's own schema and ``sky.launch``'s parameters where SkyPilot imports."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"skypilot accepts a mapping with {', '.join(PASS_THROUGH_SECTIONS)}; got {value!r}")
    out: dict[str, dict[str, Any]] = {}
    for section, fields in value.items():
        if section not in PASS_THROUGH_SECTIONS:
            raise FieldError(f"skypilot.{section}", f"unknown section{suggest(section, PASS_THROUGH_SECTIONS)}; accepted: {', '.join(PASS_THROUGH_SECTIONS)}")
        if not isinstance(fields, Mapping):
            raise FieldError(f"skypilot.{section}", f"a mapping of SkyPilot's own {section} fields; got {fields!r}")
        for key in fields:
            if key in _MODELLED[section]:
                raise FieldError(f"skypilot.{section}.{key}", f"skyvm sets this itself: use {_MODELLED[section][key]} instead")
        out[str(section)] = dict(fields)
    _check_against_skypilot(out)
    return out


def _check_against_skypilot(sections: dict[str, dict[str, Any]]) -> None:
    try:
        import inspect

        from sky import launch as sky_launch
        from sky.utils import common_utils, schemas
    except ImportError:
        return  # checked where the task is built: SkyPilot's own parser refuses what it does not know
    checks = (("resources", schemas.get_resources_schema()), ("task", schemas.get_task_schema()))
    for section, schema in checks:
        fields = sections.get(section)
        if not fields:
            continue
        for key in fields:
            if key not in schema["properties"]:
                raise FieldError(f"skypilot.{section}.{key}", f"SkyPilot's {section} has no field {key!r}{suggest(key, schema['properties'])}")
        sub = {**schema, "required": []}
        try:
            common_utils.validate_schema(dict(fields), sub, f"skypilot.{section}: ")
        except ValueError as exc:
            raise FieldError(f"skypilot.{section}", str(exc)) from None
    launch = sections.get("launch") or {}
    params = [p for p in inspect.signature(sky_launch).parameters if not p.startswith("_")]
    for key in launch:
        if key not in params:
            raise FieldError(f"skypilot.launch.{key}", f"sky.launch takes no {key!r}{suggest(key, params)}; it takes {', '.join(params)}")


def candidate_layers(fields: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The resource fields of each candidate over the node's own (a candidate naming a place
    replaces the node's place whole); [] for a node without candidates."""
    if fields.get("spot_fallback"):
        candidates = [{"use_spot": True}, {"use_spot": False}]
    else:
        candidates = fields.get("any_of") or fields.get("ordered") or []
    base = {k: fields[k] for k in CANDIDATE_FIELDS if fields.get(k) is not None}
    out = []
    for cand in candidates:
        merged = {k: v for k, v in base.items() if not (k in LOCATION_FIELDS and any(c in cand for c in LOCATION_FIELDS))}
        out.append({**merged, **cand})
    return out


def check_combination(fields: Mapping[str, Any]) -> None:
    """Candidates that cannot mean one thing."""
    if fields.get("any_of") and fields.get("ordered"):
        raise FieldError("ordered", "give any_of (the cheapest feasible candidate wins) or ordered (the first feasible wins), not both")
    if fields.get("spot_fallback"):
        other = next((f for f in CANDIDATE_LISTS if fields.get(f)), None)
        if other:
            raise FieldError("spot_fallback", f"spot_fallback is ordered: [{{use_spot: true}}, {{use_spot: false}}]; it cannot be combined with {other} (put use_spot in its candidates)")
        if fields.get("use_spot") is not None:
            raise FieldError("spot_fallback", "spot_fallback tries spot then on demand itself: drop use_spot")

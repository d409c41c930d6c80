"""The shared settings file both engines read, and the layers that make one node's settings.

Holds: ``SettingsFile`` (the file's shape as pydantic models: ``connectors``, ``defaults``,
``profiles``, ``nodes``, each layer checked alone), ``SkyVMConfig`` (a loaded file: ``resolve``
applies the layers of one node and checks the result whole), ``validate_layer``,
``merge_layers`` and ``as_config`` (what users may pass as ``settings=``).

Precedence, lowest first: built-in defaults, ``defaults``, the node's profile, ``nodes[name]``,
arguments in code, a per-call override. Every error names the file, the layer that set the bad
field, and what is accepted.

Reads ``$SKYVM_CONFIG`` and ``./skyvm.yaml`` only when ``SkyVMConfig.load`` is called; holds no
module-level state.

May import: pydantic, yaml, :mod:`skyvm.settings.node`, :mod:`skyvm.validation`,
:mod:`skyvm.errors`; :mod:`skyvm.connectors.base` only inside functions (it imports the settings).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from skyvm.errors import SettingsError
from skyvm.settings.node import NodeSettings, unknown_key
from skyvm.validation import problems, suggest

TOP_LEVEL = ("connectors", "defaults", "profiles", "nodes")
# Fields whose values are mappings merged key by key across layers, so a node
# can add one env var without repeating the defaults' others.
_MERGED_MAPPINGS = ("envs", "secrets", "labels")


class NodeEntry(NodeSettings):
    """A node's entry under ``nodes:``: a layer of settings, and the profile it starts from (one
    of the file's, named in the validation context as ``profiles``)."""

    profile: Any = None

    @field_validator("profile")
    @classmethod
    def _a_profile_of_the_file(cls, value: Any, info: ValidationInfo) -> Any:
        problem = _unknown_profile(value, (info.context or {}).get("profiles", ()))
        if problem:
            raise ValueError(problem)
        return value


def _unknown(loc: Sequence[str]) -> str:
    """An unknown key in the file: at the top, or inside a layer (``defaults`` is one deep, a profile or node two)."""
    if len(loc) == 1:
        return f"unknown top-level key{suggest(loc[0], TOP_LEVEL)}; accepted: {', '.join(TOP_LEVEL)}"
    return unknown_key(loc[1:] if loc[0] == "defaults" else loc[2:])


def _section_order(problem: tuple[str, str]) -> int:
    """Unknown top-level keys first, then the sections in the file's order."""
    section = problem[0].split(".")[0]
    return TOP_LEVEL.index(section) + 1 if section in TOP_LEVEL else 0


def _unknown_profile(profile: Any, profiles: Sequence[str]) -> Optional[str]:
    if profile in profiles:
        return None
    known = ", ".join(sorted(profiles)) or "none defined"
    return f"unknown profile {profile!r}{suggest(str(profile), profiles)}; profiles in this file: {known}"


class SettingsFile(BaseModel):
    """The file as written. Validate it with the context ``{"partial": True}``: each layer is checked
    alone here; the layers merged into each node are checked by ``SkyVMConfig``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    connectors: dict[str, Any] = Field(default_factory=dict)
    defaults: Optional[NodeSettings] = None
    profiles: dict[str, Optional[NodeSettings]] = Field(default_factory=dict)
    nodes: dict[str, Optional[NodeEntry]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, data: Any) -> Any:
        if data is None:
            return {}
        if not isinstance(data, Mapping):
            raise ValueError(f"the file must hold a mapping with keys {', '.join(TOP_LEVEL)}; got {type(data).__name__}")
        return dict(data)

    @field_validator("connectors", "profiles", "nodes", mode="before")
    @classmethod
    def _section(cls, value: Any) -> dict[str, Any]:
        section = value or {}
        if not isinstance(section, Mapping):
            raise ValueError(f"expected a mapping of NAME: settings, got {type(section).__name__}")
        return {str(k): v for k, v in section.items()}

    @field_validator("connectors")
    @classmethod
    def _connectors(cls, value: dict[str, Any]) -> dict[str, Any]:
        from skyvm.connectors.base import parse_connector

        return {name: parse_connector(name, conn, f"connectors.{name}") for name, conn in value.items()}

    @classmethod
    def check(cls, data: Any) -> "SettingsFile":
        """``data`` (the file's YAML) validated, each layer alone; a node's entry may name the file's profiles."""
        profiles = data.get("profiles") if isinstance(data, Mapping) else None
        names = [str(k) for k in profiles] if isinstance(profiles, Mapping) else []
        return cls.model_validate(data, context={"partial": True, "profiles": names})

    def node_profiles(self) -> dict[str, Any]:
        return {name: e.profile for name, e in self.nodes.items() if e is not None and "profile" in e.model_fields_set}

    @staticmethod
    def layer(model: Optional[NodeSettings]) -> dict[str, Any]:
        """The fields a layer sets (``{}`` for an empty one)."""
        return {} if model is None else model.model_dump(exclude_unset=True, exclude={"profile"})


def validate_layer(layer: Any, path: str, source: Optional[str] = None) -> dict[str, Any]:
    """Check a partial set of settings on its own (unknown keys, forms); returns the fields it sets."""
    if layer is None:
        return {}
    try:
        model = NodeSettings.model_validate(dict(layer) if isinstance(layer, Mapping) else layer, context={"partial": True})
    except ValidationError as exc:
        raise SettingsError(problems(exc, path, unknown=unknown_key), source) from None
    return SettingsFile.layer(model)


def merge_layers(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Later layers win; envs/secrets/labels merge key by key."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key in _MERGED_MAPPINGS and isinstance(merged.get(key), dict) and isinstance(value, Mapping):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return merged


class SkyVMConfig:
    """The shared settings file: ``defaults``, named ``profiles`` and per-node ``nodes``.

    Precedence, lowest first: built-in defaults, ``defaults``, the node's
    profile, ``nodes[name]``, arguments in code, a per-call override.
    """

    def __init__(self, data: Optional[Mapping[str, Any]] = None, source: Optional[str] = None):
        self.source = source
        try:
            file = SettingsFile.check(data)
        except ValidationError as exc:
            # Every problem in the file at once, in the order of its sections (unknown keys first).
            raise SettingsError(sorted(problems(exc, unknown=_unknown), key=_section_order), source) from None
        self.connectors = dict(file.connectors)
        self.defaults = file.layer(file.defaults)
        self.profiles: dict[str, dict[str, Any]] = {name: file.layer(layer) for name, layer in file.profiles.items()}
        self.nodes: dict[str, dict[str, Any]] = {name: file.layer(layer) for name, layer in file.nodes.items()}
        self.node_profiles: dict[str, Any] = file.node_profiles()
        # Resolve everything once so cross-field mistakes (infra vs region,
        # Lambda limits) in the defaults, any profile or node surface now, not at launch; each
        # names the layer that set the bad field.
        self._resolve_layers([self.defaults], "defaults", paths=["defaults"])
        for name in self.profiles:
            self._resolve_layers([self.defaults, self.profiles[name]], f"profiles.{name}", paths=["defaults", f"profiles.{name}"])
        for name in self.nodes:
            self.resolve(name)

    @classmethod
    def load(cls, path: Union[str, os.PathLike, None] = None) -> "SkyVMConfig":
        """Load the explicit path, else ``$SKYVM_CONFIG``, else ``./skyvm.yaml``, else built-in defaults."""
        if path is None:
            path = os.environ.get("SKYVM_CONFIG") or None
            if path is None and Path("skyvm.yaml").is_file():
                path = "skyvm.yaml"
        if path is None:
            return cls({}, source=None)
        file = Path(path)
        if not file.is_file():
            raise SettingsError([("", "settings file not found")], str(file))
        try:
            data = yaml.safe_load(file.read_text())
        except yaml.YAMLError as exc:
            raise SettingsError([("", f"not valid YAML: {exc}")], str(file)) from None
        return cls(data, source=str(file))

    def _resolve_layers(self, layers: list[Mapping[str, Any]], path: str, extra_connectors: Optional[dict] = None, paths: Optional[list[str]] = None) -> NodeSettings:
        defs = {name: c.public_dump() for name, c in {**self.connectors, **(extra_connectors or {})}.items()}
        try:
            return NodeSettings.model_validate({**merge_layers(*layers), "connector_defs": defs})
        except ValidationError as exc:
            found = problems(exc, unknown=unknown_key)
            raise SettingsError([(_layer_of(where, layers, paths, path), msg) for where, msg in found], self.source) from None

    def resolve(
        self,
        node: str,
        *,
        profile: Optional[str] = None,
        code: Optional[Mapping[str, Any]] = None,
        override: Optional[Mapping[str, Any]] = None,
    ) -> NodeSettings:
        """The settings of one node, all layers applied."""
        code = dict(code or {})
        override = dict(override or {})
        # Connector objects given in code join the file's, under their names.
        extra: dict[str, Any] = {}
        for layer in (code, override):
            if "connector" in layer:
                layer["connector"], found = _connector_objects(layer["connector"])
                extra.update(found)
        # A profile named in code or in the per-call override beats the node entry's.
        for layer in (code, override):
            if "profile" in layer:
                profile = layer.pop("profile") or profile
        chosen = profile or self.node_profiles.get(node)
        problem = _unknown_profile(chosen, list(self.profiles)) if chosen else None
        if problem:
            raise SettingsError([("profile", problem)], self.source)
        profile_layer = self.profiles[chosen] if chosen else {}
        layers = [
            self.defaults,
            profile_layer,
            self.nodes.get(node, {}),
            validate_layer(code, "arguments", "code"),
            validate_layer(override, "override", "code"),
        ]
        paths = ["defaults", f"profiles.{chosen}", f"nodes.{node}", "arguments", "override"]
        return self._resolve_layers(layers, f"nodes.{node}", extra, paths=paths)


def _layer_of(where: str, layers: list[Mapping[str, Any]], paths: Optional[list[str]], default: str) -> str:
    """``where`` (a field path inside a node) under the last layer that set its field: an error
    points at the line to change, not at the node that merely inherited it."""
    field = where.split(".")[0]
    if field and paths:
        for layer, layer_path in reversed(list(zip(layers, paths))):
            if field in layer:
                return f"{layer_path}.{where}"
    return f"{default}.{where}" if where else default


def _connector_objects(value: Any) -> tuple[Any, dict]:
    """``connector=`` in code may hold Connector objects: their names, and the objects by name."""
    from skyvm.connectors.base import Connector

    items = value if isinstance(value, (list, tuple)) else [value]
    if not any(isinstance(v, Connector) for v in items):
        return value, {}
    names, found = [], {}
    for item in items:
        if isinstance(item, Connector):
            name = item.name or f"{item.type}-{item.fingerprint()[:6]}"
            found[name] = item.model_copy(update={"name": name})
            names.append(name)
        else:
            names.append(item)
    return (names if isinstance(value, (list, tuple)) else names[0]), found


def as_config(settings: Union[None, str, os.PathLike, Mapping[str, Any], SkyVMConfig]) -> SkyVMConfig:
    """Accept what users pass as ``settings=``: a path, a dict shaped like the file, a config, or None."""
    if isinstance(settings, SkyVMConfig):
        return settings
    if isinstance(settings, Mapping):
        return SkyVMConfig(settings, source="<settings dict>")
    return SkyVMConfig.load(settings)

"""skyvm's one formatter of pydantic's validation errors, and the "did you mean" hint.

Holds: ``problems`` (a ``ValidationError`` as the ``(path, message)`` pairs that
:class:`skyvm.errors.SettingsError` prints as ``FILE: PATH: MESSAGE``), ``unknown_field`` (the
text for a key a model does not have), and the two ways a message repeats the value it refused
(``typed_input``, the settings'; ``any_input``, the connectors').

Every model that users write (the settings file, a node's settings, a connector) is reported
through ``problems``, so a mistake reads the same wherever it is made.

Re-exports ``suggest`` (the " (did you mean 'x'?)" hint) and ``FieldError`` (a validator's error
naming a field below the one pydantic reports), both from :mod:`skyvm.candidates`, their first user.

May import: pydantic, :mod:`skyvm.errors`, :mod:`skyvm.candidates` (standard library only); nothing
that imports the settings or the connectors, which both import this.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Sequence

from pydantic import ValidationError

from skyvm.candidates import FieldError, suggest
from skyvm.errors import SettingsError

__all__ = ["FieldError", "any_input", "problems", "suggest", "typed_input", "unknown_field"]

# pydantic's type errors: the message says what was expected, so the value given is added.
_TYPE_ERRORS = ("string_type", "int_", "float_", "bool_", "dict_", "list_")


def unknown_field(name: str, accepted: Iterable[str]) -> str:
    accepted = list(accepted)
    return f"unknown field {name!r}{suggest(name, accepted)}; accepted fields: {', '.join(sorted(accepted))}"


def typed_input(err: dict[str, Any], msg: str) -> str:
    """The settings' form: a type error repeats the value; an enum repeats it with the accepted values."""
    if err["type"].startswith(_TYPE_ERRORS):
        return f"{msg} (got {err.get('input')!r})"
    if err["type"] == "literal_error":
        # An enum: repeat what was given, and the nearest accepted value when one is close.
        accepted = re.findall(r"'([^']*)'", (err.get("ctx") or {}).get("expected", ""))
        return f"got {err.get('input')!r}{suggest(str(err.get('input')), accepted)}; accepted: {', '.join(repr(a) for a in accepted)}"
    return msg


def any_input(err: dict[str, Any], msg: str) -> str:
    """The connectors' form: every error but a validator's own message ends with the value given."""
    if "input" in err and err["type"] != "value_error":
        return f"{msg}; got {err['input']!r}"
    return msg


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def problems(
    exc: ValidationError,
    prefix: str = "",
    *,
    unknown: Callable[[Sequence[str]], str],
    note: Callable[[dict[str, Any], str], str] = typed_input,
    spelled: Callable[[list[str]], list[str]] = list,
) -> list[tuple[str, str]]:
    """``exc`` as ``(path, message)`` pairs, each path under ``prefix``.

    ``spelled(loc)`` turns pydantic's place into the keys a user wrote (a model nested only in
    code, such as a discriminated union's tag, drops out); ``unknown(loc)`` words a key the model
    at ``loc`` does not have (``loc[-1]`` is the key); ``note(err, message)`` adds the refused value
    to the rest. A validator's ``FieldError`` names its field below the place pydantic reports; a
    ``SettingsError`` raised inside a validator (a part checked whole, such as a connector) keeps
    its own problems, paths and all.
    """
    out: list[tuple[str, str]] = []
    for err in exc.errors():
        loc = spelled([str(p) for p in err["loc"]])
        found = (err.get("ctx") or {}).get("error")
        if isinstance(found, SettingsError):
            out.extend(found.problems)
            continue
        path = _join(prefix, *loc, found.field) if isinstance(found, FieldError) else _join(prefix, *loc)
        if err["type"] == "extra_forbidden":
            msg = unknown(loc)
        else:
            msg = note(err, err["msg"].removeprefix("Value error, "))
        out.append((path, msg))
    return out

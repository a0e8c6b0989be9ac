"""`--format` of `inspect` and `ps`: `json`, or a template such as '{{.Name}}\\t{{.Status}}' over
the command's JSON document, as podman's Go templates read, but only field lookups: no functions
but `json`, no pipelines, nothing evaluated."""

from __future__ import annotations

import json
import re
from typing import Any

from cryptlayer.errors import UsageError, printable

_ACTION = re.compile(r"\{\{\s*(.*?)\s*\}\}", re.DOTALL)
_PATH = re.compile(r"(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.")
_ESCAPES = {"\\t": "\t", "\\n": "\n"}  # as podman reads them in a --format


def _key(name: str) -> str:
    """A field name as compared: any case, with or without `_` (`.ManifestDigest`)."""
    return name.replace("_", "").lower()


def _lookup(doc: Any, path: str, template: str) -> Any:
    value = doc
    parts = [p for p in path.split(".") if p]
    for depth, part in enumerate(parts):
        found = [k for k in value if _key(k) == _key(part)] if isinstance(value, dict) else []
        if not found:
            where = "." + ".".join(parts[:depth]) if depth else "the document"
            fields = ", ".join(f".{k}" for k in value) if isinstance(value, dict) else "none"
            raise UsageError(
                f"--format {template!r}: {where} has no field {part!r}",
                f"its fields are {fields}",
            )
        value = value[found[0]]
    return value


def _text(value: Any) -> str:
    if isinstance(value, str):
        return printable(value)  # an image's strings must not forge lines or escapes
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value)


def _literal(text: str, template: str) -> str:
    if "{{" in text or "}}" in text:
        raise UsageError(f"--format {template!r}: an unclosed {{{{ or }}}}", "write {{.Field}}")
    for escape, char in _ESCAPES.items():
        text = text.replace(escape, char)
    return text


def render(template: str, doc: Any) -> str:
    """`template` with each {{.Field.Sub}} (or {{json .Field}}, {{.}}) replaced from `doc`;
    UsageError naming what is wrong and the fields there are."""
    out: list[str] = []
    end = 0
    for match in _ACTION.finditer(template):
        out.append(_literal(template[end : match.start()], template))
        end = match.end()
        action = match.group(1)
        as_json = action.startswith("json ")
        path = action.removeprefix("json ").strip() if as_json else action
        if not _PATH.fullmatch(path):
            raise UsageError(
                f"--format {template!r}: {{{{{action}}}}} is not a field",
                "write {{.Field}} or {{json .Field}}: no other template functions are supported",
            )
        value = _lookup(doc, path, template)
        out.append(json.dumps(value) if as_json else _text(value))
    out.append(_literal(template[end:], template))
    return "".join(out)

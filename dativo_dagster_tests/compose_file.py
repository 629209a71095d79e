"""docker-compose.yml as Compose reads it: parsed, then every string interpolated from an environment (what a
`.env` file or the shell gives), following the compose specification's rules for ``${VAR}``, ``${VAR:-default}``,
``${VAR-default}`` (defaults may nest), ``$VAR`` and ``$$``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"


def _braced_end(text: str, start: int) -> int:
    """Index of the ``}`` closing the ``${`` that starts at ``start`` (defaults may hold further ``${...}``)."""
    depth = 0
    for index in range(start, len(text)):
        if text.startswith("${", index):
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return index
    raise ValueError(f"unclosed ${{ in {text!r}")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """``text`` with its variables replaced from ``env`` (unset and no default: empty, as Compose does)."""
    out: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char != "$":
            out.append(char)
            index += 1
            continue
        if text.startswith("$$", index):
            out.append("$")
            index += 2
            continue
        if text.startswith("${", index):
            end = _braced_end(text, index)
            body = text[index + 2 : end]
            match = re.fullmatch(rf"({_NAME})(?:(:?-)(.*))?", body, flags=re.DOTALL)
            if match is None:
                raise ValueError(f"unsupported interpolation ${{{body}}} in {text!r}")
            name, operator, default = match.groups()
            value = env.get(name)
            if (operator == ":-" and not value) or (operator == "-" and value is None):
                value = interpolate(default, env)
            out.append(value or "")
            index = end + 1
            continue
        match = re.match(_NAME, text[index + 1 :])
        if match is None:
            raise ValueError(f"a lone $ in {text!r}: write $$")
        out.append(env.get(match.group(0), ""))
        index += 1 + match.end()
    return "".join(out)


def variables(text: str) -> set[str]:
    """Names of the variables a compose file reads (``$$`` escapes excluded)."""
    unescaped = text.replace("$$", "")
    return set(re.findall(rf"\$\{{({_NAME})", unescaped)) | set(re.findall(rf"\$({_NAME})", unescaped))


def strings(node: Any) -> list[str]:
    """Every string value of a parsed document (Compose interpolates values, never comments or keys)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [text for value in node.values() for text in strings(value)]
    if isinstance(node, list):
        return [text for value in node for text in strings(value)]
    return []


def _walk(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: _walk(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_walk(value, env) for value in node]
    return node


def raw_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The file parsed (YAML anchors and merge keys resolved), variables left as written."""
    return yaml.safe_load(path.read_text())


def load_compose(env: Mapping[str, str] | None = None, path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The file as Compose runs it with ``env`` as the `.env` file (none: every default)."""
    return _walk(raw_compose(path), env or {})


def service_environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's ``environment`` (mapping or ``KEY=VALUE`` list form) as a dict of strings."""
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {key: "" if value is None else str(value) for key, value in environment.items()}

"""Read a stack file (Pulumi.<stack>.yaml) as the Pulumi CLI does, and check it against Pulumi.yaml.

The CLI parses stack files with Go's go-yaml, which reads scalars by YAML 1.2's core schema: `3:30`
is the text "3:30" (PyYAML, a YAML 1.1 reader, makes it the base-60 number 210) and `yes`, `no`,
`on`, `off` are words, not booleans. A top-level value that is a scalar reaches the program as its
text, exactly as written; a list or a map reaches it as JSON (pulumi/pulumi
sdk/go/common/resource/config/value.go, `unmarshalValue`). This module takes the YAML nodes from
PyYAML's composer, which resolves nothing, and resolves plain scalars itself, as go-yaml v3 does
(resolve.go).

Refused, each with one line naming the file: YAML syntax errors (with the line); a key that is not
`<namespace>:<name>`, or that is given twice (go-yaml refuses that too); a value of the project's
namespace that does not have the `type:` Pulumi.yaml declares, which `pulumi up` also refuses before
the program runs (sdk/go/common/workspace/config.go, `validateStackConfigValue`); and a secret key
in plain text (Pulumi: "must be encrypted as it's secret"). One rule is stricter than the CLI: a
string key whose unquoted value YAML reads as a number, boolean or null must be quoted. Pulumi takes
the text as written, but every other reader of the file, and the person editing it, may not: an
unquoted version 1.10 is "1.10" to Pulumi and the number 1.1 to PyYAML.

Encrypted values (`secure: ...`) are left out of the result: only the CLI can decrypt them, so the
offline plan keeps its placeholder for them. Keys the program does not declare are returned as they
are: infra/settings.py refuses those, under the CLI as well as here.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

PROJECT = "katforge"


class StackFileError(Exception):
    """A stack file that the CLI would refuse or read differently; the message is one line."""


_NULL = {"", "~", "null", "Null", "NULL"}
_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INFINITY = {".inf", ".Inf", ".INF"}
_NAN = {".nan", ".NaN", ".NAN"}
# go-yaml v3 drops underscores from a number, then tries Go's integer syntax (0x, 0o, 0b prefixes and
# legacy octal 0777 included), then its YAML float pattern.
_INT = re.compile(r"[-+]?(0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|0[0-7]*|[1-9][0-9]*)")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def plain_scalar(text: str) -> Any:
    """The value of an unquoted scalar as go-yaml v3 resolves it (YAML 1.2 core schema)."""
    if text in _NULL:
        return None
    if text in _BOOL:
        return _BOOL[text]
    if text in _NAN:
        return math.nan
    unsigned = text[1:] if text[:1] in "+-" else text
    sign = -1 if text[:1] == "-" else 1
    if unsigned in _INFINITY:
        return sign * math.inf
    number = text.replace("_", "")
    if text[:1] in "+-.0123456789" and _INT.fullmatch(number):
        digits = number.lstrip("+-")
        legacy_octal = len(digits) > 1 and digits[0] == "0" and digits[1].isdigit()
        return sign * int(digits, 8 if legacy_octal else 0)
    if text[:1] in "+-.0123456789" and _FLOAT.fullmatch(number):
        return float(number)
    return text


class _Reader:
    """One stack file's nodes; every refusal names the file, and the line where it can."""

    def __init__(self, path: Path):
        self.name = path.name
        self.stack = path.stem.removeprefix("Pulumi.")

    def error(self, node: Node, message: str) -> StackFileError:
        return StackFileError(f"{self.name}: line {node.start_mark.line + 1}: {message}")

    def invalid(self, key: str, node: Node, expected: str) -> StackFileError:
        """The settings' own form (infra/settings.py), with the line at the end."""
        return StackFileError(f"{self.name}: {key} = {_shown(node)}: expected {expected} "
                              f"(line {node.start_mark.line + 1})")

    def value(self, node: Node, path: tuple[int, ...] = ()) -> Any:
        """A node as Python data (YAML 1.2 scalars); `path` holds the nodes being read, to stop at a cycle."""
        if id(node) in path:
            raise self.error(node, "an alias refers to the value that contains it")
        inner = (*path, id(node))
        if isinstance(node, ScalarNode):
            return plain_scalar(node.value) if node.style is None else node.value
        if isinstance(node, SequenceNode):
            return [self.value(item, inner) for item in node.value]
        return {str(self.value(key, inner)): self.value(item, inner) for key, item in self.pairs(node)}

    def pairs(self, node: MappingNode) -> list[tuple[Node, Node]]:
        """A map's key and value nodes, refusing a key given twice."""
        first: dict[str, Node] = {}
        for key, _ in node.value:
            if not isinstance(key, ScalarNode):
                raise self.error(key, "a key must be plain text, not a list or a map")
            if key.value in first:
                raise self.error(key, f"{key.value} is given twice (first on line {first[key.value].start_mark.line + 1})")
            first[key.value] = key
        return node.value

    def config(self, document: Optional[Node]) -> Optional[MappingNode]:
        """The `config:` map of the document, or None when it has none."""
        if document is None:
            return None
        if not isinstance(document, MappingNode):
            raise self.error(document, "expected a map with a `config:` section")
        node = next((value for key, value in self.pairs(document) if key.value == "config"), None)
        if node is None or isinstance(node, ScalarNode) and node.style is None and plain_scalar(node.value) is None:
            return None
        if not isinstance(node, MappingNode):
            raise self.error(node, "expected `config:` to be a map of <namespace>:<name>: value")
        return node

    def check(self, key: str, node: Node, declaration: dict) -> None:
        """Refuse a value that is not of its declared type, or a secret in plain text."""
        if declaration.get("secret"):
            # The value is not shown: it is a secret, and now it needs changing.
            raise StackFileError(f"{self.name}: {key} = [secret]: expected an encrypted value (line "
                                 f"{node.start_mark.line + 1}): remove it, set a new one with: "
                                 f"pulumi config set --secret {key} --stack {self.stack}")
        problem = _type_problem(node, declaration, top=True)
        if problem:
            raise self.invalid(key, node, problem)
        if isinstance(node, SequenceNode) and declaration.get("items"):
            for index, item in enumerate(node.value):
                problem = _type_problem(item, declaration["items"], top=False)
                if problem:
                    raise self.invalid(f"{key}[{index}]", item, problem)


def _shown(node: Node) -> str:
    """A value as the stack file has it, for an error line."""
    if isinstance(node, ScalarNode):
        return (node.value if node.style is None else json.dumps(node.value)) or "(nothing)"
    return "(a list)" if isinstance(node, SequenceNode) else "(a map)"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def _type_problem(node: Node, declaration: dict, top: bool) -> Optional[str]:
    """What a value lacks to be of its declared type (the words after `expected`), or None.
    `top`: the key's own value, which Pulumi takes as text; an item of a list keeps its YAML type."""
    kind = declaration.get("type")
    if kind == "array":
        return None if isinstance(node, SequenceNode) else "a list, one item per line starting with '- '"
    if not isinstance(node, ScalarNode):
        return f"a single {kind or 'value'}, not a list or a map"
    text, quoted = node.value, node.style is not None
    resolved = text if quoted else plain_scalar(text)
    if kind == "string" and not isinstance(resolved, str):
        return f"a quoted string, e.g. {json.dumps(text)}; unquoted, YAML reads {_type_name(resolved)}"
    if kind == "integer":
        # Pulumi parses text with Go's strconv.Atoi; a list item may also be any whole number.
        if top or quoted:
            whole = bool(re.fullmatch(r"[-+]?[0-9]+", text))
        else:
            whole = not isinstance(resolved, bool) and (
                isinstance(resolved, int) or isinstance(resolved, float) and resolved.is_integer())
        return None if whole else "a whole number, e.g. 30"
    if kind == "boolean" and not (text in ("true", "false") or not top and isinstance(resolved, bool)):
        return "true or false"
    return None


def _is_secure(value: Any) -> bool:
    """An encrypted value, `{secure: <ciphertext>}`, or a list or map holding one (value.go)."""
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get("secure"), str):
            return True
        return any(_is_secure(v) for v in value.values())
    return isinstance(value, list) and any(_is_secure(v) for v in value)


def read(path: Path, schema: dict[str, dict]) -> dict[str, Any]:
    """The stack file's config as the CLI hands it to the program, keyed `<namespace>:<name>`: a
    scalar as its text, a list or map as data. `schema` is the `config:` block of Pulumi.yaml. A
    missing file is an empty config, as for the CLI."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # the CLI strips a UTF-8 byte order mark too
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as error:
        raise StackFileError(f"{path.name}: cannot be read: {error}") from None
    reader = _Reader(path)
    try:
        document = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        context = error.context
        if context and error.context_mark and error.context_mark.line != mark.line:
            context += f" (from line {error.context_mark.line + 1})"
        problem = "; ".join(part for part in (context, error.problem) if part)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise StackFileError(f"{path.name}: {where}YAML syntax error: {problem}") from None
    except yaml.YAMLError as error:
        raise StackFileError(f"{path.name}: YAML error: {' '.join(str(error).split())}") from None
    config_node = reader.config(document)
    config: dict[str, Any] = {}
    for key_node, node in reader.pairs(config_node) if config_node else ():
        key = key_node.value
        namespace, _, name = key.partition(":")
        if not namespace or not name or ":" in name:
            raise reader.error(key_node, f"{key} is not a config key: expected <namespace>:<name>, "
                                         f"e.g. {PROJECT}:{key.rpartition(':')[2] or 'acmeEmail'}")
        value = node.value if isinstance(node, ScalarNode) else reader.value(node)
        if _is_secure(value):
            continue
        if namespace == PROJECT and name in schema:
            reader.check(key, node, schema[name])
        config[key] = value
    return config

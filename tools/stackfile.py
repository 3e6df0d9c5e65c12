"""Read a stack file (Pulumi.<stack>.yaml) as the Pulumi CLI does, and check it against Pulumi.yaml;
set keys in one (`write`, for `make discover`) changing no other byte.

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


def read(path: Path, schema: dict[str, dict], encrypted: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The stack file's config as the CLI hands it to the program, keyed `<namespace>:<name>`: a
    scalar as its text, a list or map as data. `schema` is the `config:` block of Pulumi.yaml. A
    missing file is an empty config, as for the CLI. Encrypted values are left out; given a dict,
    `encrypted` receives them as they are written (ciphertext), so a rotation can still be seen."""
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
            if encrypted is not None:
                encrypted[key] = json.dumps(value, sort_keys=True)
            continue
        if namespace == PROJECT and name in schema:
            reader.check(key, node, schema[name])
        config[key] = value
    return config


# --- writing -------------------------------------------------------------------------------------
# `make discover` sets keys in a stack file that people also edit and review, so a write changes the
# lines of the keys it sets and nothing else: comments, blank lines, the order of keys, other keys and
# encrypted values stay byte for byte, and setting a key to the value it has leaves the file untouched.
# The nodes' positions come from PyYAML's composer; a list that only grows keeps its lines (and the
# comments among them) and gets the new items after them.

_PLAIN_SAFE = re.compile(r"[A-Za-z0-9_./=+@,~-][A-Za-z0-9_./=+@,~ :-]*")


def scalar_text(value: Any) -> str:
    """A value as the stack file writes it: plain where every YAML reader takes it as the same text,
    otherwise double-quoted (JSON's escapes are YAML's)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str):
        raise TypeError(f"a stack file value is text, a whole number or a boolean, not {value!r}")
    plain = (_PLAIN_SAFE.fullmatch(value) and not value.endswith((" ", ":")) and ": " not in value
             and " #" not in value and not value.startswith(("- ", "? ", ": ")) and plain_scalar(value) == value
             and yaml.safe_load(f"k: {value}") == {"k": value})
    return value if plain else json.dumps(value)


def _end(node: Node) -> int:
    """Where a value's text ends: a block list ends with its last item, not at the next key."""
    if isinstance(node, SequenceNode) and node.flow_style is False and node.value:
        return _end(node.value[-1])
    if isinstance(node, MappingNode) and node.flow_style is False and node.value:
        return _end(node.value[-1][1])
    return node.end_mark.index


def _block(key: str, value: Any, indent: int) -> str:
    """`key: value` (or the key and its list) at `indent`, without a final newline."""
    pad = " " * indent
    if isinstance(value, list):
        if not value:
            return f"{pad}{key}: []"
        return f"{pad}{key}:" + "".join(f"\n{pad}  - {scalar_text(item)}" for item in value)
    return f"{pad}{key}: {scalar_text(value)}"


def _cli_value(value: Any) -> Any:
    """What `read` gives back for a value written here: a top-level scalar as its text."""
    if isinstance(value, list):
        return value
    return scalar_text(value) if not isinstance(value, str) else value


def _config_key(document: Optional[Node]) -> Optional[ScalarNode]:
    if not isinstance(document, MappingNode):
        return None
    return next((key for key, _ in document.value if isinstance(key, ScalarNode) and key.value == "config"), None)


def write(path: Path, values: dict[str, Any], schema: dict[str, dict]) -> list[str]:
    """Set each `<namespace>:<name>` of `values` in the stack file (a list of text, text, a whole
    number or a boolean; None removes the key) and return the keys whose value changed. Keys that
    are declared secret are refused: their values belong in `pulumi config set --secret`."""
    for key in values:
        namespace, _, name = key.partition(":")
        if namespace == PROJECT and schema.get(name, {}).get("secret"):
            raise StackFileError(f"{path.name}: {key} is a secret: set it with pulumi config set --secret {key}")
    current = read(path, schema)
    wanted = {key: value for key, value in values.items()
              if (current.get(key) if key in current else None) != (None if value is None else _cli_value(value))}
    if not wanted:
        return []
    text = path.read_text(encoding="utf-8-sig") if path.exists() else ""
    document = yaml.compose(text, Loader=yaml.SafeLoader)
    config = _Reader(path).config(document)
    if config is not None and config.flow_style:
        raise StackFileError(f"{path.name}: `config:` is written as a flow map ({{...}}): write it as one key a line")
    pairs = {key.value: (key, node) for key, node in config.value} if config is not None else {}
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement), applied from the end
    for key, value in wanted.items():
        if key not in pairs:
            continue
        key_node, node = pairs[key]
        if _is_secure(_Reader(path).value(node)):
            raise StackFileError(f"{path.name}: {key} holds an encrypted value: set it with pulumi config set")
        if value is None:
            start = text.rfind("\n", 0, key_node.start_mark.index) + 1
            end = text.find("\n", _end(node))
            edits.append((start, len(text) if end < 0 else end + 1, ""))
            continue
        old = current.get(key)
        if (isinstance(value, list) and isinstance(old, list) and isinstance(node, SequenceNode)
                and not node.flow_style and node.value and value[:len(old)] == old):
            # A list that only grows: the new items go after the last one, at its indentation.
            dash = " " * (node.value[0].start_mark.column - 2)
            line_end = text.find("\n", _end(node))
            at = len(text) if line_end < 0 else line_end  # after the last item's comment, if any
            edits.append((at, at, "".join(f"\n{dash}- {scalar_text(item)}" for item in value[len(old):])))
            continue
        indent = key_node.start_mark.column
        new = _block(key, value, indent)[indent + len(key):]
        edits.append((key_node.end_mark.index, _end(node), new))
    added = [key for key, value in wanted.items() if key not in pairs and value is not None]
    if added and config is not None and config.value:
        # After the last key's value (and anything on its line), at the keys' indentation.
        indent = config.value[0][0].start_mark.column
        line_end = text.find("\n", _end(config.value[-1][1]))
        at = len(text) if line_end < 0 else line_end
        edits.append((at, at, "".join("\n" + _block(key, wanted[key], indent) for key in added)))
    elif added:
        block = "".join(_block(key, wanted[key], 2) + "\n" for key in added)
        key_node = _config_key(document)
        if key_node is None:  # no `config:` at all: a new section at the end
            head = "" if not text or text.endswith("\n") else "\n"
            edits.append((len(text), len(text), head + "config:\n" + block))
        else:  # `config:` with nothing under it: the keys go on the lines after it
            value = next(node for key, node in document.value if key is key_node)
            edits.append((key_node.end_mark.index, value.end_mark.index, ":"))
            line_end = text.find("\n", value.end_mark.index)
            at = len(text) if line_end < 0 else line_end + 1
            edits.append((at, at, ("" if line_end >= 0 else "\n") + block))
    for start, end, replacement in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        text = text[:start] + replacement + text[end:]
    temporary = path.with_name(f".{path.name}.katforge-tmp")
    temporary.write_text(text, encoding="utf-8")
    if path.exists():
        temporary.chmod(path.stat().st_mode & 0o7777)
    temporary.replace(path)
    written = read(path, schema)
    wrong = [key for key, value in wanted.items()
             if written.get(key) != (None if value is None else _cli_value(value))]
    if wrong:  # a bug here, not a user error: say which key
        raise StackFileError(f"{path.name}: {wrong[0]} did not read back as written")
    return sorted(wanted)

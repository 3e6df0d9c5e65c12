"""Adopting what already runs: which resources of this program take over a live object, by import.

`katforge:imports` (written by `make discover`, reviewed by an operator) lists lines
`<Type>:<name>=<import ID>`: `<Type>` is the last part of the resource's type token (`Instance`, `Eip`,
`User`, `Deployment`, ...), `<name>` its logical name in this program, and the ID what `pulumi import`
takes for that type (an instance ID, an allocation ID, a user name, `namespace/name`, ...). A resource
that can take over a live object asks for its ID with `import_id`; a line that no resource asks for is a
typo or a stale line, and `check_all_claimed` stops the program naming it.

Pulumi imports a resource whose `import` option is set and then updates whatever differs; a difference
in a force-new property becomes a replacement instead, so the live facts that cannot change in place
(a root volume's encryption, a subnet) have config keys of their own (see Pulumi.yaml), and
`make preflight` checks every import before `up`. Once a resource is in the state, Pulumi ignores an
`import` option with the ID it was imported with, so the lines may stay; a line changed to another ID
would import that object and replace, i.e. delete, the one in the state (pulumi/pulumi
pkg/resource/deploy/step_generator.go @00285a9b6248, `isImport` and NewImportReplacementStep). To let a
resource be created anew (a lost host), remove its lines.
"""
from __future__ import annotations

import difflib
from typing import Mapping, Optional

from infra.settings import invalid

_lines: dict[str, str] = {}
_claimed: set[str] = set()


def key(type_: str, name: str) -> str:
    return f"{type_}:{name}"


def use(imports: Mapping[str, str]) -> None:
    """Start a program run with the stack's import lines (`Settings.imports`)."""
    _lines.clear()
    _lines.update(imports)
    _claimed.clear()


def import_id(type_: str, name: str) -> Optional[str]:
    """The live ID the resource `<type_>:<name>` takes over, or None to create it."""
    wanted = key(type_, name)
    _claimed.add(wanted)
    return _lines.get(wanted)


def claimed() -> tuple[str, ...]:
    """Every `<Type>:<name>` of the last run that can take over a live object: what an import line may name."""
    return tuple(sorted(_claimed))


def check_all_claimed() -> None:
    """After every resource is declared: each import line must have named one of them."""
    unclaimed = sorted(set(_lines) - _claimed)
    if unclaimed:
        wrong = unclaimed[0]
        close = difflib.get_close_matches(wrong, _claimed, n=1, cutoff=0.6)
        same_type = sorted(k for k in _claimed if k.startswith(wrong.split(":")[0] + ":"))
        hint = (f"; did you mean {close[0]}?" if close else
                f"; this stack's {wrong.split(':')[0]} resources: {', '.join(same_type)}" if same_type else
                f"; this stack adopts no {wrong.split(':')[0]} (is the line in the right stack's file?)")
        raise invalid("imports", f"{wrong}={_lines[wrong]}",
                      f"a line naming a resource of this stack that can be adopted (<Type>:<name>=<id>){hint}")

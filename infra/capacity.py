"""The k3s host's memory budget, checked before anything is declared.

Everything that lives on the one t3.medium counts: the OS, k3s itself, PostgreSQL, k3s's system
pods, Traefik, and the memory limits of every app pod of BOTH stages (prod and qa share the host).
Pure: `estate_report()` reads the tables, `lines()` renders it for `make plan`, and `check()` raises
CapacityError so a preview fails before an over-committed host is deployed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import pulumi

from infra import apps, traefik_values
from infra.bootstrap import K3S_MEMORY_MIB, POSTGRES_MEMORY_MIB, SYSTEM_MEMORY_MIB
from infra.settings import STAGES

HOST_MEMORY_MIB = 4096  # t3.medium

# k3s's own pods. CoreDNS's limit comes from k3s's manifest; metrics-server, local-path-provisioner
# and ServiceLB's svclb pod declare none, so these are what we budget for them.
K3S_SYSTEM_PODS_MIB = {"coredns": 170, "metrics-server": 100, "local-path-provisioner": 64, "svclb-traefik": 32}


class CapacityError(pulumi.RunError):
    """The host's memory is over-committed; Pulumi prints the message without a traceback."""


@dataclass(frozen=True)
class Item:
    name: str
    mib: int


@dataclass(frozen=True)
class Report:
    items: tuple[Item, ...]
    capacity_mib: int

    @property
    def total_mib(self) -> int:
        return sum(item.mib for item in self.items)

    @property
    def headroom_mib(self) -> int:
        return self.capacity_mib - self.total_mib


def report(pods: Iterable[Item], capacity_mib: int = HOST_MEMORY_MIB) -> Report:
    host = (Item("system (OS and host services)", SYSTEM_MEMORY_MIB),
            Item("k3s server", K3S_MEMORY_MIB),
            Item("PostgreSQL 16", POSTGRES_MEMORY_MIB))
    system_pods = tuple(Item(f"kube-system/{name}", mib) for name, mib in K3S_SYSTEM_PODS_MIB.items())
    return Report(items=host + system_pods + tuple(pods), capacity_mib=capacity_mib)


def estate_report() -> Report:
    """The budget of the estate as the tables declare it: Traefik and every app of every stage."""
    pods = [Item(f"{traefik_values.NAMESPACE}/traefik", traefik_values.MEMORY_LIMIT_MIB)]
    for stage in STAGES.values():
        # An app pod's limit is its container's: the migrate init container has the same limit and
        # runs before it, never beside it.
        pods += [Item(f"{stage.namespace}/{app.name}", app.resources.memory_limit_mib)
                 for app in apps.apps_in(stage.name)]
    # A rolling update starts the new pod before the old one stops: budget one, the largest.
    pods.append(Item("rollout surge (largest app pod)", max(app.resources.memory_limit_mib for app in apps.APPS)))
    return report(pods)


def lines(budget: Report) -> list[str]:
    width = max(len(item.name) for item in budget.items)
    out = [f"Memory budget of the k3s host ({budget.capacity_mib} MiB):"]
    out += [f"  {item.name:<{width}}  {item.mib:>5} MiB" for item in budget.items]
    out.append(f"  {'total':<{width}}  {budget.total_mib:>5} MiB")
    out.append(f"  {'headroom':<{width}}  {budget.headroom_mib:>5} MiB")
    return out


def check(budget: Report) -> None:
    if budget.headroom_mib < 0:
        raise CapacityError(
            f"the k3s host is over its memory budget: {budget.total_mib} MiB committed of "
            f"{budget.capacity_mib} MiB ({-budget.headroom_mib} MiB over). Lower a memory limit in "
            "infra/apps.py or move to a larger instance.\n" + "\n".join(lines(budget)))

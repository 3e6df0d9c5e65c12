"""The k3s host's memory budget, checked before anything is declared.

The kernel keeps part of the t3.medium's 4 GiB for itself; of the rest (MemTotal) the kubelet keeps
what the host runs outside the pods (the OS, PostgreSQL, k3s: `kubelet_args` in infra/bootstrap.py
reserves exactly these figures) and allocates the remainder to pods. Every pod that can run at once
must fit in that with its memory limit: k3s's system pods, Traefik, every app pod of BOTH stages
(prod and qa share the host), one rollout surge, and the helm-install job k3s runs when Traefik's
HelmChartConfig changes. Pure: `estate_report()` reads the tables, `lines()` renders it for
`make plan`, and `check()` raises CapacityError so a preview fails before an over-committed host is
deployed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import pulumi

from infra import apps, traefik_values
from infra.bootstrap import K3S_MEMORY_MIB, POSTGRES_MEMORY_MIB, SYSTEM_MEMORY_MIB
from infra.settings import STAGES

# MemTotal of a t3.medium: 4096 MiB less the 252.7 MiB (264945664 bytes) Karpenter measured between
# the memory EC2 sells and the capacity the kubelet reports, which is MemTotal
# (aws/karpenter-provider-aws, pkg/providers/instancetype/zz_generated.memory_overhead.go). Check it on
# the host with `grep MemTotal /proc/meminfo`; another instance type needs its own figure here.
HOST_MEMTOTAL_MIB = 3843

# k3s configures the kubelet's hard eviction for disk only (evictionHard imagefs/nodefs.available 5%,
# k3s-io/k3s pkg/daemons/agent/agent.go, defaultKubeletConfig), and a partial evictionHard zeroes the
# signals it leaves out (KubeletConfiguration.mergeDefaultEvictionSettings is false by default): no
# memory.available threshold, so none is kept back from the pods.
EVICTION_HARD_MEMORY_MIB = 0

# k3s's own pods. CoreDNS's limit comes from k3s's manifest; metrics-server, local-path-provisioner
# and ServiceLB's svclb pod declare none, so these are what we budget for them.
K3S_SYSTEM_PODS_MIB = {"coredns": 170, "metrics-server": 100, "local-path-provisioner": 64, "svclb-traefik": 32}

# k3s's helm-controller runs `helm upgrade` of Traefik in a pod (klipper-helm) whenever the
# HelmChartConfig changes, with no memory limit (k3s-io/helm-controller, pkg/controllers/chart/chart.go:
# JobResources is unset unless the controller is started with one). `helm template` of this chart
# peaks at 50 MiB resident (helm v4.1.4, measured); an upgrade also holds the API's discovery data and
# the previous release, hence about 2.5 times that.
HELM_INSTALL_JOB_MIB = 128


class CapacityError(pulumi.RunError):
    """The host's memory is over-committed; Pulumi prints the message without a traceback."""


@dataclass(frozen=True)
class Item:
    name: str
    mib: int


@dataclass(frozen=True)
class Report:
    reserved: tuple[Item, ...]  # what the kubelet keeps from pods
    pods: tuple[Item, ...]  # every pod that can run at once, at its memory limit
    memtotal_mib: int

    @property
    def allocatable_mib(self) -> int:
        return self.memtotal_mib - sum(item.mib for item in self.reserved)

    @property
    def total_mib(self) -> int:
        return sum(item.mib for item in self.pods)

    @property
    def headroom_mib(self) -> int:
        return self.allocatable_mib - self.total_mib


def report(pods: Iterable[Item], memtotal_mib: int = HOST_MEMTOTAL_MIB) -> Report:
    reserved = (Item("system (OS and host services)", SYSTEM_MEMORY_MIB),
                Item("PostgreSQL 16", POSTGRES_MEMORY_MIB),
                Item("k3s server", K3S_MEMORY_MIB),
                Item("eviction threshold", EVICTION_HARD_MEMORY_MIB))
    system_pods = tuple(Item(f"kube-system/{name}", mib) for name, mib in K3S_SYSTEM_PODS_MIB.items())
    return Report(reserved=reserved, pods=system_pods + tuple(pods), memtotal_mib=memtotal_mib)


def estate_report() -> Report:
    """The budget of the estate as the tables declare it: Traefik and every app of every stage."""
    pods = [Item(f"{traefik_values.NAMESPACE}/traefik", traefik_values.MEMORY_LIMIT_MIB)]
    limits = []
    for stage in STAGES.values():
        for app in apps.apps_in(stage.name):
            # An app pod's limit is its container's: the migrate init container has the same limit and
            # runs before it, never beside it.
            limits.append(apps.resources_in(app, stage.name).memory_limit_mib)
            pods.append(Item(f"{stage.namespace}/{app.name}", limits[-1]))
    # A rolling update starts the new pod before the old one stops: one, the largest. Traefik
    # recreates its pod instead, so it never surges.
    pods.append(Item("rollout surge (largest app pod)", max(limits)))
    pods.append(Item("helm-install job (HelmChartConfig changes)", HELM_INSTALL_JOB_MIB))
    return report(pods)


def lines(budget: Report) -> list[str]:
    width = max(len(item.name) for item in budget.reserved + budget.pods) + len("kept by the kubelet: ")

    def row(name: str, mib: int) -> str:
        return f"  {name:<{width}}  {mib:>5} MiB"

    out = [f"Memory budget of the k3s host ({budget.memtotal_mib} MiB):"]
    out += [row(f"kept by the kubelet: {item.name}", item.mib) for item in budget.reserved]
    out.append(row("allocatable to pods", budget.allocatable_mib))
    out += [row(item.name, item.mib) for item in budget.pods]
    out.append(row("total of the pods' limits", budget.total_mib))
    out.append(row("headroom", budget.headroom_mib))
    return out


def check(budget: Report) -> None:
    if budget.headroom_mib < 0:
        raise CapacityError(
            f"the k3s host is over its memory budget: the pods' limits add up to {budget.total_mib} MiB, "
            f"{-budget.headroom_mib} MiB more than the {budget.allocatable_mib} MiB the kubelet allocates to "
            "pods. Lower a memory limit (APPS in infra/apps.py, infra/traefik_values.py), lower PostgreSQL's "
            "worst case (max_connections in infra/host/postgresql-katforge.conf), or move to a larger "
            "instance type and set HOST_MEMTOTAL_MIB in infra/capacity.py.\n" + "\n".join(lines(budget)))

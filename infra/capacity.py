"""The k3s host's memory budget, checked before anything is declared.

The kernel keeps part of the t3.medium's 4 GiB for itself; of the rest (MemTotal) the kubelet keeps
what the host runs outside the pods (the OS, PostgreSQL, k3s: `kubelet_args` in infra/bootstrap.py
reserves exactly these figures) and allocates the remainder to pods. Every pod that can run at once
must fit in that with its memory limit: k3s's system pods, Traefik, every app pod of BOTH stages
(prod and qa share the host), one rollout surge, and the helm-install job k3s runs when Traefik's
HelmChartConfig changes. Pure: `estate_report()` reads the tables, `lines()` renders it for
`make plan`, and `check()` raises CapacityError so a preview fails before an over-committed host is
deployed.

With k3s agents (katforge:k3sAgents) every node has its own budget: an agent keeps the OS and the k3s
agent from its pods (no PostgreSQL), and runs ServiceLB's svclb pod. Traefik, k3s's system pods and the
helm-install job are counted on the k3s host (Traefik is pinned there; nothing moves a running pod), and
the app pods of both stages and the rollout surge are placed, largest first, each on the node with the
most memory left, as the scheduler's default scoring (NodeResourcesFit, LeastAllocated) spreads pods. The
preview shows which node each app pod's worst case (its limit) lands on, and stops when a node is over.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence, Union

import pulumi

from infra import apps, traefik_values
from infra.bootstrap import K3S_AGENT_MEMORY_MIB, K3S_MEMORY_MIB, POSTGRES_MEMORY_MIB, SYSTEM_MEMORY_MIB
from infra.hosts import AGENT_TAG
from infra.settings import STAGES, AgentSpec

# MemTotal of an instance type: the memory EC2 sells less what Karpenter measured between it and the
# capacity the kubelet reports, which is MemTotal (aws/karpenter-provider-aws @15e87699c992,
# pkg/providers/instancetype/zz_generated.memory_overhead.go, in bytes). x86_64 types only: the hosts
# boot Ubuntu's amd64 image. Check one on its host with `grep MemTotal /proc/meminfo`; another type
# needs its row here.
_EC2_MEMORY = {  # instance type: (MiB EC2 sells, overhead bytes)
    "t3.small": (2048, 137269248), "t3.medium": (4096, 264945664), "t3.large": (8192, 382386176),
    "t3.xlarge": (16384, 617746432), "t3a.small": (2048, 130977792), "t3a.medium": (4096, 252362752),
    "t3a.large": (8192, 359317504), "t3a.xlarge": (16384, 571609088), "m6i.large": (8192, 424321024),
    "m6i.xlarge": (16384, 703729664),
}
MEMTOTAL_MIB = {kind: int(mib - overhead / 2 ** 20) for kind, (mib, overhead) in _EC2_MEMORY.items()}
HOST_MEMTOTAL_MIB = MEMTOTAL_MIB["t3.medium"]  # the k3s host: 4096 MiB less 252.7 MiB

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
    """One node's budget."""
    reserved: tuple[Item, ...]  # what the kubelet keeps from pods
    pods: tuple[Item, ...]  # every pod that can run at once, at its memory limit
    memtotal_mib: int
    node: str = "k3s"
    instance_type: str = ""  # an agent's; the k3s host's title is its own

    @property
    def allocatable_mib(self) -> int:
        return self.memtotal_mib - sum(item.mib for item in self.reserved)

    @property
    def total_mib(self) -> int:
        return sum(item.mib for item in self.pods)

    @property
    def headroom_mib(self) -> int:
        return self.allocatable_mib - self.total_mib


@dataclass(frozen=True)
class Estate:
    """The k3s host and its agents, each with its own budget and the pods placed on it."""
    nodes: tuple[Report, ...]

    def node_of(self, pod: str) -> str:
        return next(node.node for node in self.nodes if any(item.name == pod for item in node.pods))


def nodes_of(budget: Union[Report, Estate]) -> tuple[Report, ...]:
    return budget.nodes if isinstance(budget, Estate) else (budget,)


def node_label(node: Report) -> str:
    """How a message names the node: the k3s host, or the agent by its name."""
    return f"agent {node.node}" if node.instance_type else "the k3s host"


SVCLB_POD = "kube-system/svclb-traefik"  # ServiceLB's DaemonSet pod, one on every node


def report(pods: Iterable[Item], memtotal_mib: int = HOST_MEMTOTAL_MIB) -> Report:
    reserved = (Item("system (OS and host services)", SYSTEM_MEMORY_MIB),
                Item("PostgreSQL 16", POSTGRES_MEMORY_MIB),
                Item("k3s server", K3S_MEMORY_MIB),
                Item("eviction threshold", EVICTION_HARD_MEMORY_MIB))
    system_pods = tuple(Item(f"kube-system/{name}", mib) for name, mib in K3S_SYSTEM_PODS_MIB.items())
    return Report(reserved=reserved, pods=system_pods + tuple(pods), memtotal_mib=memtotal_mib)


def agent_report(agent: AgentSpec, pods: Iterable[Item] = ()) -> Report:
    """An agent's budget: the kubelet keeps the OS and the k3s agent (kubelet_args(agent=True))."""
    reserved = (Item("system (OS and host services)", SYSTEM_MEMORY_MIB),
                Item("k3s agent", K3S_AGENT_MEMORY_MIB),
                Item("eviction threshold", EVICTION_HARD_MEMORY_MIB))
    return Report(reserved=reserved, pods=(Item(SVCLB_POD, K3S_SYSTEM_PODS_MIB["svclb-traefik"]), *pods),
                  memtotal_mib=MEMTOTAL_MIB[agent.instance_type], node=agent.name,
                  instance_type=agent.instance_type)


def app_pods() -> list[Item]:
    """Every app pod of every stage at its limit, and the rollout surge."""
    pods = []
    for stage in STAGES.values():
        for app in apps.apps_in(stage.name):
            # An app pod's limit is its container's: the migrate init container has the same limit and
            # runs before it, never beside it.
            pods.append(Item(f"{stage.namespace}/{app.name}", apps.resources_in(app, stage.name).memory_limit_mib))
    # A rolling update starts the new pod before the old one stops: one, the largest. Traefik
    # recreates its pod instead, so it never surges.
    pods.append(Item("rollout surge (largest app pod)", max(pod.mib for pod in pods)))
    return pods


def estate_report(agents: Sequence[AgentSpec] = ()) -> Union[Report, Estate]:
    """The budget of the estate as the tables declare it: Traefik and every app of every stage, on the k3s
    host alone (a Report) or on it and its agents (an Estate)."""
    traefik = Item(f"{traefik_values.NAMESPACE}/traefik", traefik_values.MEMORY_LIMIT_MIB)
    helm_job = Item("helm-install job (HelmChartConfig changes)", HELM_INSTALL_JOB_MIB)
    if not agents:
        return report([traefik, *app_pods(), helm_job])
    # Largest first, each where the most memory is left; the surge last, as it comes and goes.
    nodes = [report([traefik, helm_job]), *(agent_report(agent) for agent in agents)]
    *pods, surge = app_pods()
    for pod in [*sorted(pods, key=lambda p: -p.mib), surge]:
        emptiest = max(range(len(nodes)), key=lambda i: (nodes[i].headroom_mib, -i))
        nodes[emptiest] = replace(nodes[emptiest], pods=(*nodes[emptiest].pods, pod))
    return Estate(nodes=tuple(nodes))


def _node_lines(budget: Report, title: str) -> list[str]:
    width = max(len(item.name) for item in budget.reserved + budget.pods) + len("kept by the kubelet: ")

    def row(name: str, mib: int) -> str:
        return f"  {name:<{width}}  {mib:>5} MiB"

    out = [title]
    out += [row(f"kept by the kubelet: {item.name}", item.mib) for item in budget.reserved]
    out.append(row("allocatable to pods", budget.allocatable_mib))
    out += [row(item.name, item.mib) for item in budget.pods]
    out.append(row("total of the pods' limits", budget.total_mib))
    out.append(row("headroom", budget.headroom_mib))
    return out


def _title(node: Report) -> str:
    if node.instance_type:
        return f"Memory budget of agent {node.node} ({node.instance_type}, {node.memtotal_mib} MiB):"
    return f"Memory budget of the k3s host ({node.memtotal_mib} MiB):"


def lines(budget: Union[Report, Estate]) -> list[str]:
    if isinstance(budget, Report):
        return _node_lines(budget, _title(budget))
    out = []
    for node in budget.nodes:
        out += _node_lines(node, _title(node)) + [""]
    return out + placement(budget)


def placement(budget: Estate) -> list[str]:
    """One line per app pod (and the surge): the node its worst case lands on."""
    placed = [item.name for node in budget.nodes for item in node.pods if item in app_pods()]
    return ["Where each app pod's worst case (its limit) lands:",
            *(f"  {name}: {budget.node_of(name)}" for name in sorted(placed))]


def log_placement(budget: Union[Report, Estate]) -> None:
    """With agents, `pulumi preview` shows where the pods land, as `make plan` does; the k3s host alone has
    nothing to place, and its preview says nothing more."""
    if isinstance(budget, Estate):
        pulumi.log.info("\n".join(placement(budget)))


def check(budget: Union[Report, Estate]) -> None:
    over = [node for node in nodes_of(budget) if node.headroom_mib < 0]
    if not over:
        return
    who = " and ".join(node_label(node) for node in over)
    budgets = "is over its memory budget" if len(over) == 1 else "are over their memory budgets"
    what = "; ".join(f"on {node_label(node)} the pods' limits add up to {node.total_mib} MiB, {-node.headroom_mib} "
                     f"MiB more than the {node.allocatable_mib} MiB the kubelet allocates to pods" for node in over)
    raise CapacityError(
        f"{who} {budgets}: {what}. Lower a memory limit (APPS in infra/apps.py, "
        "infra/traefik_values.py), lower PostgreSQL's worst case (max_connections in "
        "infra/host/postgresql-katforge.conf), add an agent or give one a larger instance type "
        "(katforge:k3sAgents), or move the k3s host to a larger instance type and set HOST_MEMTOTAL_MIB in "
        "infra/capacity.py.\n" + "\n".join(lines(budget)))


def agents_in_plan(document: dict) -> tuple[AgentSpec, ...]:
    """The agents an offline plan declares (`make plan` shows their budget): instances tagged as agents."""
    return tuple(AgentSpec(name=r["name"], instance_type=r["inputs"]["instanceType"],
                           private_ip=r["inputs"]["privateIp"])
                 for r in document["resources"] if r["type"] == "aws:ec2/instance:Instance"
                 and r["inputs"].get("tags", {}).get(AGENT_TAG[0]) == AGENT_TAG[1])

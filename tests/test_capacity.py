"""The k3s host's memory budget: what it counts, that the kubelet is told the same figures, that it
fits today, and that overflowing it stops the program."""
from __future__ import annotations

import re
from dataclasses import replace

import pytest
import yaml

import infra.bootstrap as bootstrap
from infra import apps, capacity, traefik_values
from infra.settings import AgentSpec
from tools.offline import evaluate

STAGE_NAMESPACES = (("default", "prod"), ("qa", "qa"))


def mib(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()
    return int(number) * (1024 if unit == "Gi" else 1)


def test_budget_counts_the_host_and_every_pod_that_can_run_at_once():
    budget = capacity.estate_report()
    names = [item.name for item in budget.pods]
    assert len(names) == len(set(names))
    pods = {f"{ns}/{app.name}" for ns, stage in STAGE_NAMESPACES for app in apps.apps_in(stage)}
    assert pods == {"default/api", "default/web", "default/lextris", "default/stumper", "qa/api", "qa/web"}
    assert pods | {"kube-system/traefik", "kube-system/coredns", "rollout surge (largest app pod)",
                   "helm-install job (HelmChartConfig changes)"} <= set(names)
    assert {item.name for item in budget.reserved} == {"system (OS and host services)", "PostgreSQL 16",
                                                       "k3s server", "eviction threshold"}


def test_the_host_is_its_memtotal_not_the_4_gib_ec2_sells():
    assert capacity.estate_report().memtotal_mib == capacity.HOST_MEMTOTAL_MIB == 3843


def test_the_kubelet_reserves_exactly_what_the_budget_keeps_from_pods():
    """k3s's config hands the kubelet the same figures, so its allocatable memory is the budget's."""
    config = yaml.safe_load(bootstrap.render_k3s_config(public_ip="3.19.192.157", private_ip="172.31.14.98"))
    reserved = {arg.split("=")[0]: mib(arg.split("=memory=")[1]) for arg in config["kubelet-arg"]}
    budget = capacity.estate_report()
    items = {item.name: item.mib for item in budget.reserved}
    assert reserved == {"system-reserved": items["system (OS and host services)"] + items["PostgreSQL 16"],
                        "kube-reserved": items["k3s server"]}
    assert not any(arg.startswith("eviction-hard") for arg in config["kubelet-arg"]), \
        "k3s's own eviction thresholds stay; the budget counts their memory signal as none"
    assert budget.allocatable_mib == budget.memtotal_mib - sum(reserved.values()) - items["eviction threshold"]


def test_postgresql_is_budgeted_at_its_configured_worst_case():
    conf = (bootstrap.HOST_FILES / "postgresql-katforge.conf").read_text()
    items = {item.name: item.mib for item in capacity.estate_report().reserved}
    assert items["PostgreSQL 16"] == bootstrap.postgres_worst_case_mib(conf)
    more = conf.replace("max_connections = ", "max_connections = 1")  # 60 -> 160
    assert bootstrap.postgres_worst_case_mib(more) == items["PostgreSQL 16"] + 100 * (4 + 2)


def test_pod_figures_are_the_declared_memory_limits():
    items = {item.name: item.mib for item in capacity.estate_report().pods}
    for ns, stage in STAGE_NAMESPACES:
        for app in apps.apps_in(stage):
            manifest = apps.deployment(app, stage=stage, namespace=ns, image_tag="v1")
            [main] = manifest["spec"]["template"]["spec"]["containers"]
            [migrate] = manifest["spec"]["template"]["spec"]["initContainers"]
            # A pod's effective limit: its containers' sum, or its largest init container if bigger.
            assert items[f"{ns}/{app.name}"] == max(mib(main["resources"]["limits"]["memory"]),
                                                    mib(migrate["resources"]["limits"]["memory"]))
    assert items["kube-system/traefik"] == mib(traefik_values.RESOURCES["limits"]["memory"])


def test_qa_pods_are_limited_to_prods_request():
    for app in apps.apps_in("qa"):
        qa = apps.resources_in(app, "qa")
        assert qa.memory_limit_mib == qa.memory_request_mib == apps.resources_in(app, "prod").memory_request_mib
        assert apps.resources_in(app, "prod") == app.resources


def test_one_rollout_surge_of_the_largest_app_is_budgeted():
    items = {item.name: item.mib for item in capacity.estate_report().pods}
    largest = max(items[f"{ns}/{app.name}"] for ns, stage in STAGE_NAMESPACES for app in apps.apps_in(stage))
    assert items["rollout surge (largest app pod)"] == largest


def test_the_declared_estate_fits_the_host():
    budget = capacity.estate_report()
    assert budget.total_mib == sum(item.mib for item in budget.pods) <= budget.allocatable_mib
    capacity.check(budget)


def test_an_over_committed_host_fails_with_the_figures_and_what_to_change():
    budget = capacity.report([capacity.Item("default/hog", 4096)])
    with pytest.raises(capacity.CapacityError, match=r"over its memory budget: .* \d+ MiB the kubelet allocates") \
            as info:
        capacity.check(budget)
    assert "default/hog" in str(info.value)
    assert "infra/apps.py" in str(info.value) and "max_connections" in str(info.value)


def test_exactly_full_is_still_within_budget():
    base = capacity.report([])
    capacity.check(capacity.report([capacity.Item("pod", base.headroom_mib)]))
    with pytest.raises(capacity.CapacityError):
        capacity.check(capacity.report([capacity.Item("pod", base.headroom_mib + 1)]))


def test_lines_show_every_item_the_allocatable_memory_the_total_and_the_headroom():
    budget = capacity.report([capacity.Item("default/api", 384)])
    text = capacity.lines(budget)
    assert text[0] == "Memory budget of the k3s host (3843 MiB):"
    assert any(line.split()[-4:] == ["PostgreSQL", "16", str(bootstrap.POSTGRES_MEMORY_MIB), "MiB"] for line in text)
    assert any(line.split() == ["allocatable", "to", "pods", str(budget.allocatable_mib), "MiB"] for line in text)
    assert any(line.split() == ["default/api", "384", "MiB"] for line in text)
    assert text[-2].split()[-2:] == [str(budget.total_mib), "MiB"]
    assert text[-1].split() == ["headroom", str(budget.allocatable_mib - budget.total_mib), "MiB"]


def test_the_preview_fails_when_the_budget_is_exceeded(monkeypatch):
    monkeypatch.setattr(capacity, "POSTGRES_MEMORY_MIB", 3072)
    with pytest.raises(capacity.CapacityError, match="over its memory budget"):
        evaluate("prod")


# --- several nodes: the k3s host and its agents -----------------------------------------------------

AGENT = AgentSpec("agent-1", "t3.medium", "172.31.14.120")
SMALL = AgentSpec("agent-2", "t3.small", "172.31.20.40")


def test_memtotal_is_what_ec2_sells_less_karpenters_measured_overhead():
    assert capacity.MEMTOTAL_MIB["t3.medium"] == capacity.HOST_MEMTOTAL_MIB == 3843  # 4096 - 264945664 bytes
    assert capacity.MEMTOTAL_MIB["t3.small"] == 1917 and capacity.MEMTOTAL_MIB["t3.large"] == 7827
    assert all(0 < mib < {"small": 2048, "medium": 4096, "large": 8192, "xlarge": 16384}[kind.split(".")[1]]
               for kind, mib in capacity.MEMTOTAL_MIB.items())


def test_an_agent_keeps_the_os_and_the_k3s_agent_and_runs_servicelbs_pod():
    """What the agent's kubelet is told to reserve (its config.yaml) is what its budget keeps."""
    node = capacity.agent_report(AGENT)
    reserved = {arg.split("=")[0]: mib(arg.split("=memory=")[1]) for arg in bootstrap.kubelet_args(agent=True)}
    items = {item.name: item.mib for item in node.reserved}
    assert reserved == {"system-reserved": items["system (OS and host services)"], "kube-reserved": items["k3s agent"]}
    assert "PostgreSQL 16" not in items and node.memtotal_mib == 3843
    assert [item.name for item in node.pods] == ["kube-system/svclb-traefik"]


def test_with_agents_every_app_pod_lands_on_exactly_one_node_and_traefik_stays_on_the_host():
    estate = capacity.estate_report((AGENT, SMALL))
    assert [node.node for node in estate.nodes] == ["k3s", "agent-1", "agent-2"]
    placed = [item.name for node in estate.nodes for item in node.pods]
    apps_and_surge = {item.name for item in capacity.app_pods()}
    assert sorted(p for p in placed if p in apps_and_surge) == sorted(apps_and_surge)
    assert estate.node_of("kube-system/traefik") == "k3s" == estate.node_of("kube-system/coredns")
    assert placed.count("kube-system/svclb-traefik") == 3  # a DaemonSet: one a node
    # The same pods as on one host (less nothing), and each node's reserve instead of one.
    single = capacity.estate_report()
    assert sorted(p for p in placed if p != "kube-system/svclb-traefik") == \
        sorted(item.name for item in single.pods if item.name != "kube-system/svclb-traefik")
    capacity.check(estate)


def test_each_pod_goes_largest_first_where_the_most_memory_is_left():
    estate = capacity.estate_report((SMALL,))
    # agent-2 (t3.small: 1917 - 384 - 320 - 32 = 1181 MiB free) against the host's 2075 - 750 = 1325: the
    # largest pod goes to the host; then each where more is left.
    order = sorted(capacity.app_pods()[:-1], key=lambda p: -p.mib)
    assert estate.node_of(order[0].name) == "k3s"
    # Replaying the rule gives the same placement.
    left = {"k3s": 1325, "agent-2": 1181}
    for pod in [*order, capacity.app_pods()[-1]]:
        node = max(left, key=lambda n: (left[n], n == "k3s"))
        assert estate.node_of(pod.name) == node, pod.name
        left[node] -= pod.mib


def test_the_preview_says_which_node_each_app_pods_worst_case_lands_on():
    estate = capacity.estate_report((AGENT,))
    text = capacity.lines(estate)
    assert text[0] == "Memory budget of the k3s host (3843 MiB):"
    assert "Memory budget of agent agent-1 (t3.medium, 3843 MiB):" in text
    where = text[text.index("Where each app pod's worst case (its limit) lands:") + 1:]
    assert where == sorted(where) and {line.split(": ")[0].strip() for line in where} == {
        item.name for item in capacity.app_pods()}
    assert all(line.split(": ")[1] in ("k3s", "agent-1") for line in where)


def test_an_agent_over_its_budget_stops_the_preview_naming_it(monkeypatch):
    monkeypatch.setitem(capacity.MEMTOTAL_MIB, "t3.small", 700)  # 700 - 384 - 320 leaves no room at all
    with pytest.raises(capacity.CapacityError) as info:
        capacity.check(capacity.estate_report((AGENT, SMALL)))
    assert str(info.value).startswith("agent agent-2 is over its memory budget: on agent agent-2 the pods' limits "
                                      "add up to ")
    assert "k3s host is over" not in str(info.value)


def test_every_node_over_its_budget_is_named_first():
    host, agent = capacity.report([capacity.Item("default/hog", 4096)]), capacity.agent_report(SMALL)
    agent = replace(agent, pods=(*agent.pods, capacity.Item("qa/hog", 2048)))
    with pytest.raises(capacity.CapacityError) as both:
        capacity.check(capacity.Estate(nodes=(host, capacity.agent_report(AGENT), agent)))
    with pytest.raises(capacity.CapacityError) as alone:
        capacity.check(host)
    assert str(both.value).startswith("the k3s host and agent agent-2 are over their memory budgets: on the k3s "
                                      "host the pods' limits add up to ")
    assert "; on agent agent-2 the pods' limits add up to " in str(both.value)
    assert str(alone.value).startswith("the k3s host is over its memory budget: on the k3s host the pods' limits")


def test_agents_let_apps_that_overflow_the_host_fit(monkeypatch):
    big = apps.App("big", "ghcr.io/katforge/big", routes={"prod": (apps.Route("big.katforge.com"),)},
                   resources=apps.Resources("100m", "1", 1024, 1536))
    every = apps.apps_in
    monkeypatch.setattr(apps, "apps_in", lambda stage: every(stage, (*apps.APPS, big)))
    with pytest.raises(capacity.CapacityError):
        capacity.check(capacity.estate_report())
    # Its rollout surge needs room for a second 1536 MiB pod too: not on a t3.medium agent, on a t3.large.
    with pytest.raises(capacity.CapacityError, match="rollout surge"):
        capacity.check(capacity.estate_report((AGENT,)))
    capacity.check(capacity.estate_report((AgentSpec("agent-1", "t3.large", "172.31.14.120"),)))


def test_make_plan_finds_the_agents_in_a_plan(prod):
    from tests import scaled

    assert capacity.agents_in_plan(prod.document()) == ()
    assert capacity.agents_in_plan(scaled.agents(2).document()) == (
        AgentSpec("agent-1", "t3.medium", "172.31.14.120"), AgentSpec("agent-2", "t3.large", "172.31.20.40"))

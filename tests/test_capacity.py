"""The k3s host's memory budget: what it counts, that it fits today, and that overflowing it stops
the program."""
from __future__ import annotations

import re

import pytest

from infra import apps, capacity, traefik_values
from tools.offline import evaluate


def mib(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()
    return int(number) * (1024 if unit == "Gi" else 1)


def test_budget_counts_the_host_and_every_pod_of_both_stages():
    budget = capacity.estate_report()
    names = [item.name for item in budget.items]
    assert len(names) == len(set(names))
    pods = {f"{ns}/{app.name}" for ns, stage in (("default", "prod"), ("qa", "qa")) for app in apps.apps_in(stage)}
    assert pods == {"default/api", "default/web", "default/lextris", "default/stumper", "qa/api", "qa/web"}
    assert pods | {"kube-system/traefik", "kube-system/coredns", "k3s server", "PostgreSQL 16"} <= set(names)
    assert budget.capacity_mib == 4096


def test_pod_figures_are_the_declared_memory_limits():
    items = {item.name: item.mib for item in capacity.estate_report().items}
    for ns, stage in (("default", "prod"), ("qa", "qa")):
        for app in apps.apps_in(stage):
            manifest = apps.deployment(app, namespace=ns, image_tag="v1")
            [main] = manifest["spec"]["template"]["spec"]["containers"]
            [migrate] = manifest["spec"]["template"]["spec"]["initContainers"]
            # A pod's effective limit: its containers' sum, or its largest init container if bigger.
            assert items[f"{ns}/{app.name}"] == max(mib(main["resources"]["limits"]["memory"]),
                                                    mib(migrate["resources"]["limits"]["memory"]))
    assert items["kube-system/traefik"] == mib(traefik_values.RESOURCES["limits"]["memory"])


def test_one_rollout_surge_of_the_largest_app_is_budgeted():
    items = {item.name: item.mib for item in capacity.estate_report().items}
    largest = max(items[f"{ns}/{app.name}"] for ns, stage in (("default", "prod"), ("qa", "qa"))
                  for app in apps.apps_in(stage))
    assert items["rollout surge (largest app pod)"] == largest


def test_the_declared_estate_fits_the_host():
    budget = capacity.estate_report()
    assert budget.total_mib == sum(item.mib for item in budget.items) <= 4096
    capacity.check(budget)


def test_an_over_committed_host_fails_with_the_figures():
    budget = capacity.report([capacity.Item("default/hog", 4096)])
    with pytest.raises(capacity.CapacityError, match=r"over its memory budget: \d+ MiB committed of 4096 MiB") as info:
        capacity.check(budget)
    assert "default/hog" in str(info.value)


def test_exactly_full_is_still_within_budget():
    base = capacity.report([])
    capacity.check(capacity.report([capacity.Item("pod", base.headroom_mib)]))
    with pytest.raises(capacity.CapacityError):
        capacity.check(capacity.report([capacity.Item("pod", base.headroom_mib + 1)]))


def test_lines_show_every_item_the_total_and_the_headroom():
    budget = capacity.report([capacity.Item("default/api", 384)])
    text = capacity.lines(budget)
    assert text[0] == "Memory budget of the k3s host (4096 MiB):"
    assert any(line.split() == ["default/api", "384", "MiB"] for line in text)
    assert text[-2].split() == ["total", str(budget.total_mib), "MiB"]
    assert text[-1].split() == ["headroom", str(4096 - budget.total_mib), "MiB"]


def test_the_preview_fails_when_the_budget_is_exceeded(monkeypatch):
    monkeypatch.setattr(capacity, "POSTGRES_MEMORY_MIB", 3072)
    with pytest.raises(capacity.CapacityError, match="over its memory budget"):
        evaluate("prod")

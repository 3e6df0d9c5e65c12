"""The estate diagram: drawn from the plans, with every host, app and DNS name and the traffic paths."""
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from tools import diagram
from tools.offline import evaluate_cached

ROOT = Path(__file__).resolve().parent.parent
NODE = re.compile(r'^\s*(n[0-9a-f]{10}) \[.*?\blabel="((?:[^"\\]|\\.)*)"', re.M)
EDGE = re.compile(r'^\s*(n[0-9a-f]{10}) -> (n[0-9a-f]{10}) \[.*?\blabel="((?:[^"\\]|\\.)*)"', re.M)


@pytest.fixture(scope="module")
def plans():
    return [json.loads(evaluate_cached(stack).to_json()) for stack in ("prod", "qa")]


@pytest.fixture(scope="module")
def drawn(plans):
    """The DOT source as boxes (id -> label lines) and arrows (tail, head, label)."""
    source = diagram.dot_source(plans)
    nodes = {node: label.replace("\\n", "\n").split("\n") for node, label in NODE.findall(source)}
    edges = [(tail, head, label.replace("\\n", " ")) for tail, head, label in EDGE.findall(source)]
    return nodes, edges


def resources(plans, type_):
    return [r for plan in plans for r in plan["resources"] if r["type"] == type_]


def titled(nodes, title):
    """The boxes whose first label line is `title`."""
    return [node for node, lines in nodes.items() if lines[0] == title]


def reachable(edges, start):
    seen, todo = {start}, [start]
    while todo:
        here = todo.pop()
        for tail, head, _ in edges:
            if tail == here and head not in seen:
                seen.add(head)
                todo.append(head)
    return seen


def test_every_host_app_and_dns_name_of_the_plans_has_its_own_box(plans, drawn):
    nodes, _ = drawn
    hosts = [r["name"] for r in resources(plans, "aws:ec2/instance:Instance")]
    apps = [r["inputs"]["metadata"]["name"] for r in resources(plans, "kubernetes:apps/v1:Deployment")]
    names = [r["inputs"]["name"] for r in resources(plans, "aws:route53/record:Record")]
    assert hosts and apps and names
    for host in hosts:
        assert len(titled(nodes, f"host {host}")) == 1, host
    # One box per Deployment (api runs in prod and in qa) and per record (mail.katforge.com has two).
    for name, count in (Counter(apps) + Counter(names)).items():
        assert len(titled(nodes, name)) == count, name


def test_the_traffic_paths_lead_from_visitors_and_names_to_the_apps_and_the_data(plans, drawn):
    nodes, edges = drawn
    (internet,) = titled(nodes, "Internet")
    (k3s_host,) = titled(nodes, "host k3s")
    (vpn_host,) = titled(nodes, "host vpn")
    (postgres,) = titled(nodes, "PostgreSQL (native)")
    (bucket,) = [n for n, lines in nodes.items() if lines[0] == "S3 bucket"]
    from_internet = reachable(edges, internet)
    assert k3s_host in from_internet and vpn_host not in from_internet  # visitors reach the sites only
    for name in ("katforge.com", "www.katforge.com", "api.katforge.com", "stumper.gg", "k3s.katforge.com",
                 "qa.katforge.com", "qa.api.katforge.com"):
        assert all(k3s_host in reachable(edges, node) for node in titled(nodes, name)), name
    assert all(vpn_host in reachable(edges, node) for node in titled(nodes, "vpn.katforge.com"))
    for deployment in resources(plans, "kubernetes:apps/v1:Deployment"):
        for app in titled(nodes, deployment["inputs"]["metadata"]["name"]):
            assert app in reachable(edges, k3s_host)  # through Traefik
            assert postgres in reachable(edges, app)
    assert bucket in reachable(edges, postgres)  # the backups


def test_qa_routes_are_drawn_as_vpn_only(drawn):
    _, edges = drawn
    qa_routes = [label for _, _, label in edges if label.startswith("qa.")]
    assert qa_routes and all("VPN only" in label for label in qa_routes)


def test_the_vpn_and_its_operators_are_drawn(drawn):
    nodes, edges = drawn
    (operators,) = titled(nodes, "Operators")
    (wireguard,) = titled(nodes, "WireGuard VPN")
    (k3s_host,) = titled(nodes, "host k3s")
    assert wireguard in reachable(edges, operators)
    assert any(tail == titled(nodes, "host vpn")[0] and head == k3s_host and "k3s API" in label
               for tail, head, label in edges)


def test_the_backup_box_shows_the_backup_timers_schedule_not_another_timers(plans, drawn):
    nodes, _ = drawn
    (box,) = titled(nodes, "backups")
    [unit] = [r["inputs"]["stdin"] for r in resources(plans, "command:remote:Command")
              if r["inputs"].get("create", "").endswith(" /etc/systemd/system/katforge-backup.timer")]
    [when] = re.findall(r"^OnCalendar=(.+)$", unit, re.M)
    assert when == "*-*-* 03:30:00 UTC"  # Pulumi.yaml's default backupTime
    # The schedule also installs the drill's monthly and the watchdog's hourly timers.
    assert nodes[box][-1] == when


def test_the_committed_diagram_is_generated_from_todays_plans(plans):
    svg = ROOT / "docs" / "estate.svg"
    assert svg.exists() and (ROOT / "docs" / "estate.png").exists(), "run make diagram"
    assert diagram.committed_digest(svg.read_text()) == diagram.digest(diagram.dot_source(plans)), \
        "docs/estate.svg is older than the program: run make diagram and commit docs/estate.*"


def test_make_diagram_says_how_to_install_graphviz_when_it_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert diagram.main([]) == 1
    assert "sudo apt-get install graphviz" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")
def test_graphviz_renders_both_formats_with_the_digest(tmp_path, plans):
    source = diagram.with_digest(diagram.dot_source(plans))
    svg, png = diagram.render(source, tmp_path)
    assert png.read_bytes().startswith(b"\x89PNG")
    assert diagram.committed_digest(svg.read_text()) == diagram.digest(diagram.dot_source(plans))


# --- the scaled estate: docs/estate-scaled.* ------------------------------------------------------

@pytest.fixture(scope="module")
def scaled_plans():
    from tests import scaled

    return [json.loads(scaled.scaled(stack).to_json()) for stack in ("prod", "qa")]


def test_the_committed_scaled_diagram_is_generated_from_todays_plans(scaled_plans):
    svg = ROOT / "docs" / "estate-scaled.svg"
    assert svg.exists() and (ROOT / "docs" / "estate-scaled.png").exists(), "run make diagram"
    assert diagram.committed_digest(svg.read_text()) == diagram.digest(diagram.dot_source(scaled_plans)), \
        "docs/estate-scaled.svg is older than the program: run make diagram and commit docs/estate*"


def test_the_scaled_diagram_shows_the_agent_joined_to_the_host_and_the_apps_on_rds(scaled_plans):
    source = diagram.dot_source(scaled_plans)
    nodes = {node: label.replace("\\n", "\n").split("\n") for node, label in NODE.findall(source)}
    edges = [(tail, head, label.replace("\\n", " ")) for tail, head, label in EDGE.findall(source)]
    (agent,) = titled(nodes, "host agent-1")
    (k3s_host,) = titled(nodes, "host k3s")
    (rds,) = titled(nodes, "RDS PostgreSQL 16")
    assert {"database katforge (prod)", "database katforge_qa (qa)"} <= set(nodes[rds])
    joined = " ".join(label for tail, head, label in edges if (tail, head) == (agent, k3s_host))
    assert all(port in joined for port in ("k3s API", "flannel VXLAN", "kubelet"))
    assert any((tail, head) == (k3s_host, agent) for tail, head, _ in edges)  # the host reaches the agent
    assert {tail for tail, head, _ in edges if head == rds} >= {agent, k3s_host}  # RDS admits the nodes
    for deployment in resources(scaled_plans, "kubernetes:apps/v1:Deployment"):
        for app in titled(nodes, deployment["inputs"]["metadata"]["name"]):
            assert any((tail, head) == (app, rds) and label.startswith("SQL") for tail, head, label in edges)
    # The default picture has neither.
    default = diagram.dot_source([json.loads(evaluate_cached(s).to_json()) for s in ("prod", "qa")])
    assert "host agent-1" not in default and "RDS PostgreSQL" not in default

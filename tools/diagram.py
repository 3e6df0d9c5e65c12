"""`make diagram`: the estate drawn from the offline plans of both stacks, never by hand.

`dot_source(plans)` reads plans in the `make plan` JSON format and returns Graphviz DOT; Graphviz then
renders docs/estate.svg and docs/estate.png. Every box and arrow comes from a planned resource: the
hosts and their Elastic IPs, the DNS names per zone, PostgreSQL and the backups on the host, the
namespaces and apps in k3s. The arrows are the traffic paths: the security group rules (who may reach
which host on which port), the DNS answers, Traefik's routes and the apps' network policies. A
resource of a known type shows up as soon as the program declares it.

The second picture, docs/estate-scaled.svg and .png, is the scaled estate of the README's "When one
host is not enough" (`SCALED`: one k3s agent, both stages' databases on RDS), drawn the same way.
"""
from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional

from infra.backups import UNIT as BACKUP_UNIT
from infra.settings import STAGES
from tools.offline import KNOWN_AFTER_DEPLOY, ROOT, SecretValue, evaluate

DOCS = ROOT / "docs"
STACKS = tuple(STAGES)
INSTALL_HINT = ("Graphviz's `dot` is not installed. Install it from the OS packages, then run `make diagram` again:\n"
                "  Debian/Ubuntu: sudo apt-get install graphviz\n"
                "  Fedora:        sudo dnf install graphviz\n"
                "  macOS:         brew install graphviz")

INSTANCE = "aws:ec2/instance:Instance"
EIP = "aws:ec2/eip:Eip"
EIP_ASSOCIATION = "aws:ec2/eipAssociation:EipAssociation"
RECORD = "aws:route53/record:Record"
INGRESS_RULE = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
BUCKET = "aws:s3/bucket:Bucket"
RDS_INSTANCE = "aws:rds/instance:Instance"
RDS_DATABASE = "katforge:database:RdsStageDatabase"
SES_IDENTITY = "aws:ses/domainIdentity:DomainIdentity"
NAMESPACES = ("kubernetes:core/v1:Namespace", "kubernetes:core/v1:NamespacePatch")
DEPLOYMENT = "kubernetes:apps/v1:Deployment"
SERVICE = "kubernetes:core/v1:Service"
SERVICE_ACCOUNT = "kubernetes:core/v1:ServiceAccount"
NETWORK_POLICY = "kubernetes:networking.k8s.io/v1:NetworkPolicy"
INGRESS_ROUTE = "kubernetes:traefik.io/v1alpha1:IngressRoute"
MIDDLEWARE = "kubernetes:traefik.io/v1alpha1:Middleware"
TRAEFIK_CONFIG = "kubernetes:helm.cattle.io/v1:HelmChartConfig"
BACKUP_SCHEDULE = "katforge:backups:BackupSchedule"
STAGE_DATABASE = "katforge:bootstrap:StageDatabase"
REMOTE_COMMAND = "command:remote:Command"
BACKUP_TIMER = f"/etc/systemd/system/{BACKUP_UNIT}.timer"

PORTS = {("tcp", 22): "SSH", ("tcp", 80): "HTTP", ("tcp", 443): "HTTPS", ("tcp", 587): "SMTP",
         ("tcp", 5432): "PostgreSQL", ("tcp", 6443): "k3s API", ("udp", 51820): "WireGuard",
         ("udp", 8472): "flannel VXLAN", ("tcp", 10250): "kubelet"}
ANYWHERE = "0.0.0.0/0"
# A port open to the whole internet serves site visitors, except the VPN's, which serves operators.
OPERATOR_PORTS = {("udp", 51820)}
POSTGRES = ("tcp", 5432)
SMTP = ("tcp", 587)
K3S_API = ("tcp", 6443)

STYLE = {  # by kind of box
    "external": {"shape": "oval", "fillcolor": "#f3f3f3"},
    "host": {"shape": "box3d", "fillcolor": "#ffe9c7"},
    "address": {"shape": "box", "fillcolor": "#fff6d6"},
    "dns": {"shape": "note", "fillcolor": "#e6f0ff"},
    "service": {"shape": "component", "fillcolor": "#e8f6e8"},
    "app": {"shape": "box", "fillcolor": "#ffffff"},
    "data": {"shape": "cylinder", "fillcolor": "#f0e6ff"},
}
OPERATORS_LABEL = "Operators\nWireGuard clients, kubectl"
# The scaled estate of the second picture: each stack's config on top of its committed one.
SCALED = {"prod": {"katforge:k3sAgents": ["agent-1,t3.medium,172.31.14.120"], "katforge:database": "rds",
                   "katforge:rdsMasterPassword": SecretValue("diagram-rds-master-password")},
          "qa": {"katforge:database": "rds"}}


def node_id(key: str) -> str:
    """A short stable id, so names appear in the source only where a label shows them."""
    return "n" + hashlib.sha1(key.encode()).hexdigest()[:10]


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def attributes(attrs: dict) -> str:
    return ", ".join(f"{key}={quote(str(value))}" for key, value in sorted(attrs.items()))


class Graph:
    """Nodes grouped in nested clusters, and edges whose labels merge when they join the same boxes."""

    def __init__(self):
        self.clusters: dict[tuple, str] = {}  # path -> label
        self.nodes: dict[str, tuple[list[str], str, tuple]] = {}  # id -> (label lines, kind, cluster path)
        self.edges: dict[tuple, set[str]] = defaultdict(set)  # (tail, head, style, note) -> labels

    def cluster(self, path: tuple, label: str) -> tuple:
        self.clusters[path] = label
        return path

    def node(self, key: str, label: str, kind: str, cluster: tuple = ()) -> str:
        self.nodes[node_id(key)] = (label.split("\n"), kind, cluster)
        return node_id(key)

    def annotate(self, node: str, line: str) -> None:
        if line not in self.nodes[node][0]:
            self.nodes[node][0].append(line)

    def edge(self, tail: str, head: str, label: str = "", style: str = "solid", note: str = "") -> None:
        labels = self.edges[tail, head, style, note]
        if label:
            labels.add(label)

    def _node_attributes(self, node: str) -> str:
        label, kind, _ = self.nodes[node]
        return attributes({"label": "\n".join(label), **STYLE[kind]})

    def _used(self, path: tuple) -> bool:
        return any(cluster[:len(path)] == path for _, _, cluster in self.nodes.values())

    def _cluster_lines(self, path: tuple, depth: int) -> list[str]:
        pad = "  " * depth
        lines = [f"{pad}{node} [{self._node_attributes(node)}];"
                 for node, (_, _, cluster) in sorted(self.nodes.items()) if cluster == path]
        for child in sorted(p for p in self.clusters
                            if len(p) == len(path) + 1 and p[:len(path)] == path and self._used(p)):
            lines.append(f"{pad}subgraph cluster_{node_id(repr(child))} {{")
            lines.append(f"{pad}  label={quote(self.clusters[child])};")
            lines += self._cluster_lines(child, depth + 1)
            lines.append(f"{pad}}}")
        return lines

    def source(self) -> str:
        lines = ["digraph estate {",
                 '  graph [rankdir=LR, fontname="Helvetica", fontsize=12, labeljust=l, style="rounded", '
                 'nodesep=0.25, ranksep=0.9];',
                 '  node [fontname="Helvetica", fontsize=10, style="filled"];',
                 '  edge [fontname="Helvetica", fontsize=9, color="#555555"];',
                 *self._cluster_lines((), 1)]
        for (tail, head, style, note), labels in sorted(self.edges.items()):
            label = "\n".join(filter(None, [", ".join(sorted(labels)), note]))
            lines.append(f"  {tail} -> {head} [{attributes({'label': label, 'style': style})}];")
        return "\n".join(lines + ["}"]) + "\n"


class Estate:
    """The resources of all plans, with the lookups the drawing needs."""

    def __init__(self, plans: Iterable[dict]):
        plans = list(plans)
        self.resources = sorted((r for plan in plans for r in plan["resources"]), key=lambda r: r["urn"])
        self.by_urn = {r["urn"]: r for r in self.resources}
        zone_ids = next((p["outputs"]["zoneIds"] for p in plans if isinstance(p["outputs"].get("zoneIds"), dict)), {})
        self.zone_names = {zone_id: name for name, zone_id in zone_ids.items()}

    def of(self, *types: str) -> list[dict]:
        return [r for r in self.resources if r["type"] in types]

    def depends_on(self, resource: dict, *types: str) -> list[dict]:
        return [self.by_urn[u] for u in resource["options"]["depends_on"]
                if u in self.by_urn and self.by_urn[u]["type"] in types]

    def component_of(self, resource: dict, component_type: str) -> Optional[dict]:
        """The component of that type declared by the same stack (one per stack)."""
        return next((r for r in self.of(component_type) if stack_of(r) == stack_of(resource)), None)

    def descendants(self, resource: Optional[dict]) -> list[dict]:
        if resource is None:
            return []
        children = [r for r in self.resources if r["parent"] == resource["urn"]]
        return children + [d for child in children for d in self.descendants(child)]


def metadata(resource: dict) -> dict:
    return resource["inputs"].get("metadata", {})


def port_of(rule_inputs: dict) -> tuple[str, int]:
    return rule_inputs.get("ipProtocol", ""), rule_inputs.get("fromPort", 0)


def port_name(port: tuple[str, int]) -> str:
    return PORTS.get(port, f"{port[0]}/{port[1]}")


def labels_match(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def route_targets(match: str) -> str:
    """`Host(`a`) && PathPrefix(`/p/`)` -> `a/p/`."""
    host = re.search(r"Host\(`([^`]+)`\)", match)
    path = re.search(r"PathPrefix\(`([^`]+)`\)", match)
    return (host.group(1) if host else "*") + (path.group(1) if path else "")


def stack_of(resource: dict) -> str:
    return resource["urn"].split("::")[0].removeprefix("urn:pulumi:")


def script_values(resources: Iterable[dict], variable: str) -> list[str]:
    """Values a host command sets for `variable` (`sudo env NAME=value ...`), in order."""
    return [m.group(1) for r in resources if r["type"] == REMOTE_COMMAND
            for m in [re.search(rf"\b{variable}=(\S+)", str(r["inputs"].get("create", "")))] if m]


class Drawing:
    """The estate's plans laid out as boxes in clusters, with traffic as arrows."""

    def __init__(self, plans: Iterable[dict]):
        self.estate = estate = Estate(plans)
        self.graph = graph = Graph()
        self.aws = graph.cluster(("aws",), "AWS us-east-2")
        self.vpc = graph.cluster(self.aws + ("vpc",), "default VPC")
        self.internet = graph.node("internet", "Internet\nsite visitors", "external")
        self.hosts = {i["urn"]: i for i in estate.of(INSTANCE)}
        # An association depends on its Elastic IP and its instance; the address is what the A records
        # depending on the Elastic IP say.
        self.eip_of = {i["urn"]: eip for association in estate.of(EIP_ASSOCIATION)
                       for eip in estate.depends_on(association, EIP)
                       for i in estate.depends_on(association, INSTANCE)}
        self.host_of_eip = {eip["urn"]: urn for urn, eip in self.eip_of.items()}
        self.public_ip = {eip["urn"]: record["inputs"]["records"][0]
                          for record in estate.of(RECORD) for eip in estate.depends_on(record, EIP)}
        addresses = [(self.public_ip.get(eip["urn"]), urn) for urn, eip in self.eip_of.items()]
        addresses += [(i["inputs"].get("privateIp"), urn) for urn, i in self.hosts.items()]
        # A stand-in names no address: two new Elastic IPs both read `(known after deploy)`.
        self.host_of_ip = {address: urn for address, urn in addresses if address and address != KNOWN_AFTER_DEPLOY}
        self.rules = estate.of(INGRESS_RULE)
        self.postgres_host = self.host_serving(POSTGRES)
        self.k3s_host = self.host_serving(K3S_API)
        self.postgres = None
        self.rds = None
        self.apps: dict[str, str] = {}  # deployment urn -> node
        self.ses = None

    # A host's security groups are among what its instance depends on; a rule's parent is its group.
    def host_with_group(self, group_urn: str) -> Optional[str]:
        return next(iter(self.hosts_with_group(group_urn)), None)

    def hosts_with_group(self, group_urn: str) -> list[str]:
        """Every host in the group: the k3s agents share one."""
        return [urn for urn, i in self.hosts.items() if group_urn in i["options"]["depends_on"]]

    def host_serving(self, port: tuple[str, int]) -> Optional[str]:
        """The host a rule of that port opens (RDS's group has no host)."""
        return next((host for r in self.rules if port_of(r["inputs"]) == port
                     for host in [self.host_with_group(r["parent"])] if host), None)

    def host_box(self, host_urn: Optional[str]) -> tuple:
        return self.vpc + (host_urn,) if host_urn else self.aws

    def draw_hosts(self) -> None:
        for urn, instance in self.hosts.items():
            name, inputs = instance["name"], instance["inputs"]
            self.graph.cluster(self.host_box(urn), f"EC2 host {name}")
            label = "\n".join(filter(None, [f"host {name}", inputs.get("instanceType"), inputs.get("privateIp")]))
            self.graph.node(urn, label, "host", self.host_box(urn))
            eip = self.eip_of.get(urn)
            if eip:
                address = "\n".join(filter(None, ["Elastic IP", self.public_ip.get(eip["urn"])]))
                self.graph.edge(self.graph.node(eip["urn"], address, "address", self.aws), node_id(urn))
        vpn_host = self.host_serving(("udp", 51820))
        if vpn_host:
            tunnel = script_values(self.estate.resources, "WG_ADDRESS")
            wireguard = self.graph.node("wireguard", "\n".join(["WireGuard VPN", *tunnel[:1]]), "service",
                                        self.host_box(vpn_host))
            self.graph.edge(node_id(vpn_host), wireguard, "udp/51820")
        if self.postgres_host:
            ip = self.hosts[self.postgres_host]["inputs"].get("privateIp")
            databases = [f"{name} ({stack_of(component)})"
                         for component in self.estate.of(STAGE_DATABASE)
                         for name in script_values(self.estate.descendants(component), "PG_DATABASE")]
            label = "\n".join(["PostgreSQL (native)", f"{ip}:5432", *(f"database {d}" for d in databases)])
            self.postgres = self.graph.node("postgresql", label, "data", self.host_box(self.postgres_host))
        for instance in self.estate.of(RDS_INSTANCE):
            inputs = instance["inputs"]
            databases = [f"{name} ({stack_of(component)})" for component in self.estate.of(RDS_DATABASE)
                         for name in script_values(self.estate.descendants(component), "PG_DATABASE")]
            label = "\n".join([f"RDS PostgreSQL {inputs.get('engineVersion', '')}", inputs.get("instanceClass", ""),
                               "private, encrypted, backed up", *(f"database {d}" for d in databases)])
            self.rds = self.graph.node(instance["urn"], label, "data", self.vpc)

    def draw_security_rules(self) -> None:
        """Who may reach which host on which port: the traffic paths into the VPC."""
        for rule in self.rules:
            targets = self.hosts_with_group(rule["parent"])
            if not targets and self.rds:  # RDS's group: the nodes it admits
                for group in rule["options"]["depends_on"]:
                    for source in self.hosts_with_group(group) if group != rule["parent"] else ():
                        self.graph.edge(node_id(source), self.rds, port_name(port_of(rule["inputs"])))
            for target in targets:
                self.draw_rule(rule, target)

    def draw_rule(self, rule: dict, target: str) -> None:
        port, cidr = port_of(rule["inputs"]), rule["inputs"].get("cidrIpv4", "")
        head = self.postgres if port == POSTGRES and self.postgres else node_id(target)
        address = cidr.removesuffix("/32")
        groups = [g for g in rule["options"]["depends_on"] if self.hosts_with_group(g)]
        if not cidr and groups == [rule["parent"]]:
            return  # from its own group: between the agents, which share it
        source_group = next((g for g in groups if g != rule["parent"]), None)
        # Another host's group or Elastic IP (an address known after deploy), or its address: the VPN,
        # NATing its clients; or another node of k3s.
        source_eip = next((self.host_of_eip[e["urn"]] for e in self.estate.depends_on(rule, EIP)
                           if e["urn"] in self.host_of_eip), None)
        if source_group or source_eip or address in self.host_of_ip:
            source = (self.host_with_group(source_group) if source_group else source_eip
                      or self.host_of_ip[address])
            vpn = source == self.host_serving(("udp", 51820))
            self.graph.edge(node_id(source), head, port_name(port), note="VPN clients" if vpn else "")
        elif cidr == ANYWHERE:
            tail = self.operators() if port in OPERATOR_PORTS else self.internet
            eip = self.eip_of.get(target)
            self.graph.edge(tail, node_id(eip["urn"]) if eip else head, port_name(port))
        elif ipaddress.ip_network(cidr).is_private:
            self.graph.annotate(head, f"{port_name(port)} open to {cidr}")
        else:
            self.graph.edge(self.operators(), head, port_name(port), note=cidr)

    def operators(self) -> str:
        return self.graph.node("operators", OPERATORS_LABEL, "external")

    def draw_dns(self) -> None:
        """Each name, where its answer leads."""
        estate, graph = self.estate, self.graph
        identities = estate.of(SES_IDENTITY)
        if identities:
            self.ses = graph.node(identities[0]["urn"], f"SES\n{identities[0]['inputs'].get('domain', '')}",
                                  "service", self.aws)
        records = estate.of(RECORD)
        by_name = {r["inputs"]["name"]: r for r in records}
        route53 = graph.cluster(self.aws + ("route53",), "Route53")
        for record in records:
            inputs = record["inputs"]
            zone = inputs.get("zoneId", "")
            box = graph.cluster(route53 + (zone,), f"zone {estate.zone_names.get(zone, zone)}")
            values = inputs.get("records", [])
            me = graph.node(record["urn"], f"{inputs['name']}\n{inputs['type']} {', '.join(values)}", "dns", box)
            target = values[0] if values else None
            eips = estate.depends_on(record, EIP)
            if inputs["type"] == "A" and eips:
                graph.edge(me, node_id(eips[0]["urn"]))
            elif inputs["type"] == "A" and target in self.host_of_ip:
                graph.edge(me, node_id(self.host_of_ip[target]), "private address: VPN only", "dashed")
            elif inputs["type"] == "CNAME" and target in by_name:
                graph.edge(me, node_id(by_name[target]["urn"]), "alias")
            elif self.ses and any(estate.by_urn[u]["type"].startswith("aws:ses/")
                                  for u in record["options"]["depends_on"] if u in estate.by_urn):
                graph.edge(me, self.ses, "verifies", "dotted")

    def draw_cluster(self) -> None:
        """k3s on the host that serves its API: Traefik's routes into the namespaces' apps. With agents the
        cluster spans the nodes, and is drawn beside them in the VPC."""
        estate, graph = self.estate, self.graph
        version = script_values(estate.resources, "K3S_VERSION")
        agents = [i["name"] for i in estate.of(INSTANCE) if i["inputs"].get("tags", {}).get("Role") == "k3s-agent"]
        where = (self.vpc if agents else self.host_box(self.k3s_host)) + ("k3s",)
        nodes = f" (nodes: k3s, {', '.join(agents)})" if agents else ""
        k3s = graph.cluster(where, " ".join(["k3s", *version[:1]]) + nodes)

        def namespace_box(name: str) -> tuple:
            stacks = sorted({stack_of(r) for r in estate.resources if metadata(r).get("namespace") == name})
            return graph.cluster(k3s + (name,), f"namespace {name}" + (f" ({', '.join(stacks)})" if stacks else ""))

        for namespace in estate.of(*NAMESPACES):
            namespace_box(metadata(namespace)["name"])
        deployments = estate.of(DEPLOYMENT)
        for deployment in deployments:
            meta = metadata(deployment)
            containers = deployment["inputs"]["spec"]["template"]["spec"].get("containers", [])
            image = containers[0]["image"].rsplit(":", 1)[0] if containers else ""
            self.apps[deployment["urn"]] = graph.node(deployment["urn"], f"{meta['name']}\n{image}", "app",
                                                      namespace_box(meta.get("namespace", "default")))
        for account in estate.of(SERVICE_ACCOUNT):
            meta = metadata(account)
            graph.node(account["urn"], f"service account {meta['name']}", "external",
                       namespace_box(meta.get("namespace", "default")))

        routes = estate.of(INGRESS_ROUTE)
        if not (routes or estate.of(TRAEFIK_CONFIG)):
            return
        traefik = graph.node("traefik", "Traefik\ningress, Let's Encrypt TLS", "service", k3s)
        if self.k3s_host:
            graph.edge(node_id(self.k3s_host), traefik, "HTTP, HTTPS")
        middlewares = {(metadata(m).get("namespace"), metadata(m)["name"]): m["inputs"].get("spec", {})
                       for m in estate.of(MIDDLEWARE)}
        services = {(metadata(s).get("namespace"), metadata(s)["name"]): s for s in estate.of(SERVICE)}
        for route in routes:
            namespace = metadata(route).get("namespace", "default")
            for rule in route["inputs"]["spec"].get("routes", []):
                specs = [middlewares.get((namespace, m["name"]), {}) for m in rule.get("middlewares", [])]
                label = route_targets(rule.get("match", ""))
                redirect = next((s["redirectRegex"]["replacement"] for s in specs if "redirectRegex" in s), None)
                if redirect:
                    label += " (301 to " + re.sub(r"^https?://|/?\$\{1\}$", "", redirect) + ")"
                vpn_only = any("ipAllowList" in s for s in specs)
                for ref in rule.get("services", []):
                    service = services.get((namespace, ref["name"]))
                    selector = service["inputs"]["spec"].get("selector", {}) if service else {}
                    for app in self.apps_selected(namespace, selector):
                        graph.edge(traefik, self.apps[app["urn"]], label + (" (VPN only)" if vpn_only else ""),
                                   "dashed" if vpn_only else "solid")

    def apps_selected(self, namespace: str, selector: dict) -> list[dict]:
        return [d for d in self.estate.of(DEPLOYMENT) if metadata(d).get("namespace", "default") == namespace
                and labels_match(selector, d["inputs"]["spec"]["template"]["metadata"].get("labels", {}))]

    def draw_app_egress(self) -> None:
        """What the apps may call, from their network policies."""
        for policy in self.estate.of(NETWORK_POLICY):
            spec = policy["inputs"]["spec"]
            selected = self.apps_selected(metadata(policy).get("namespace", "default"),
                                          spec.get("podSelector", {}).get("matchLabels", {}))
            for app in selected:
                databases = script_values(self.estate.descendants(self.estate.component_of(app, STAGE_DATABASE)),
                                          "PG_DATABASE")
                for egress in spec.get("egress", []):
                    ports = {(p.get("protocol", "TCP").lower(), p.get("port")) for p in egress.get("ports", [])}
                    cidrs = [peer["ipBlock"]["cidr"] for peer in egress.get("to", []) if "ipBlock" in peer]
                    on_host = self.postgres and (not self.rds or self.host_of_ip.get(cidrs[0].removesuffix("/32")))
                    if POSTGRES in ports and on_host:
                        self.graph.edge(self.apps[app["urn"]], self.postgres, " ".join(["SQL", *databases]))
                    elif POSTGRES in ports and self.rds:  # the VPC's port 5432: RDS, whose address moves
                        databases = script_values(self.estate.descendants(
                            self.estate.component_of(app, RDS_DATABASE)), "PG_DATABASE")
                        self.graph.edge(self.apps[app["urn"]], self.rds, " ".join(["SQL", *databases]))
                    elif SMTP in ports and self.ses:
                        self.graph.edge(self.apps[app["urn"]], self.ses, "SMTP")
                    elif ANYWHERE in cidrs:
                        self.graph.edge(self.apps[app["urn"]], self.internet,
                                        ", ".join(port_name(p) for p in sorted(ports)))

    def draw_backups(self) -> None:
        """The backup timer beside the database, and the bucket it uploads to."""
        buckets = [self.graph.node(b["urn"], f"S3 bucket\n{b['inputs'].get('bucket', b['name'])}", "data", self.aws)
                   for b in self.estate.of(BUCKET)]
        for schedule in self.estate.of(BACKUP_SCHEDULE):
            # The backup timer's own schedule: the schedule also installs the watchdog's and the drill's timers.
            timer_unit = " ".join(str(c["inputs"].get("stdin", "")) for c in self.estate.descendants(schedule)
                                  if str(c["inputs"].get("create", "")).endswith(f" {BACKUP_TIMER}"))
            when = re.search(r"OnCalendar=(.+)", timer_unit)
            label = "\n".join(["backups", "pg_dump, systemd timer", *([when.group(1).strip()] if when else [])])
            timer = self.graph.node(schedule["urn"], label, "service", self.host_box(self.postgres_host))
            if self.postgres:
                self.graph.edge(self.postgres, timer, "pg_dump")
            for bucket in buckets:
                self.graph.edge(timer, bucket, "upload")


def dot_source(plans: Iterable[dict]) -> str:
    drawing = Drawing(plans)
    for step in (drawing.draw_hosts, drawing.draw_security_rules, drawing.draw_dns, drawing.draw_cluster,
                 drawing.draw_app_egress, drawing.draw_backups):
        step()
    return drawing.graph.source()


# --- rendering ------------------------------------------------------------------------------------

def digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def with_digest(source: str) -> str:
    """Graphviz copies the graph's `comment` into the SVG: a test compares it with today's plans."""
    return source.replace("digraph estate {\n", f"digraph estate {{\n  comment={quote('plan ' + digest(source))};\n", 1)


def committed_digest(svg: str) -> Optional[str]:
    match = re.search(r"<!-- plan ([0-9a-f]{16}) -->", svg)
    return match.group(1) if match else None


def current_plans() -> list[dict]:
    return [json.loads(evaluate(stack).to_json()) for stack in STACKS]


def scaled_plans() -> list[dict]:
    """The plans of SCALED: qa's reads prod's outputs, so it is evaluated with prod's scaled config."""
    return [json.loads(evaluate(stack, SCALED[stack], prod_config=SCALED["prod"] if stack != "prod" else None)
                       .to_json()) for stack in STACKS]


def render(source: str, directory: Path = DOCS, name: str = "estate") -> list[Path]:
    directory.mkdir(exist_ok=True)
    written = []
    for fmt in ("svg", "png"):
        path = directory / f"{name}.{fmt}"
        subprocess.run(["dot", f"-T{fmt}", "-o", str(path)], input=source.encode(), check=True)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plans", nargs="*", type=Path, help="plan JSON files (default: evaluate prod and qa)")
    parser.add_argument("--dot", action="store_true", help="print the DOT source instead of rendering it")
    parser.add_argument("--scaled", action="store_true", help="with --dot: the scaled estate's")
    args = parser.parse_args(argv)
    if not args.dot and shutil.which("dot") is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 1
    if args.plans:
        pictures = {"estate": [json.loads(path.read_text()) for path in args.plans]}
    elif args.dot:
        pictures = {"estate": scaled_plans() if args.scaled else current_plans()}
    else:  # make diagram: the estate as committed, and scaled
        pictures = {"estate": current_plans(), "estate-scaled": scaled_plans()}
    for name, plans in pictures.items():
        source = with_digest(dot_source(plans))
        if args.dot:
            sys.stdout.write(source)
            continue
        for path in render(source, name=name):
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

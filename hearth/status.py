"""`hearth status`: the stage's apps as the cluster runs them, and the estate's health around them.

Read-only. The checks beyond the cluster (certificates, DNS, the newest backup) start first and run
while the cluster is read, each within its deadline. The report is one dict: `render_json` prints it
(keys sorted, the schema in hearth/status.schema.json), `render_table` lays it out for people. It is
healthy when every app has finished its rollout with every replica ready and no pod in trouble, runs at
least the replicas the program declares (a Deployment scaled to 0 has finished its rollout too, serving
nothing), and every check is `ok`.
"""
from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from typing import Optional

from hearth import probes, rollout
from hearth.estate import Estate
from hearth.kube import Cluster
from infra import apps as program
from infra import capacity

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Options:
    dns_server: Optional[probes.DnsServer] = None
    connect_to: tuple[probes.ConnectTo, ...] = ()
    timeout: float = probes.TIMEOUT_SECONDS


def iso(moment: Optional[datetime.datetime]) -> Optional[str]:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if moment else None


def age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    for limit, unit, size in ((90, "s", 1), (90 * 60, "m", 60), (48 * 3600, "h", 3600)):
        if seconds < limit:
            return f"{max(0, int(seconds // size))}{unit}"
    return f"{int(seconds // 86400)}d"


_QUANTITY = re.compile(r"^(?P<number>[0-9.]+)(?P<suffix>Ki|Mi|Gi|Ti|k|M|G|T|m)?$")
_FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def mib(quantity: str) -> int:
    """A Kubernetes memory quantity in MiB (rounded down)."""
    match = _QUANTITY.match(str(quantity))
    if not match:
        raise ValueError(f"not a quantity: {quantity!r}")
    return int(float(match["number"]) * _FACTORS[match["suffix"]] // 2**20)


# --- the apps --------------------------------------------------------------------------------------------

def _selects(app: program.App, pod: dict) -> bool:
    labels = pod["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, v in program.selector(app).items())


def app_report(app: program.App, estate: Estate, deployment: Optional[dict], sets: list[dict], pods: list[dict],
               now: datetime.datetime) -> dict:
    routes, declared = estate.routes(app), estate.declared_replicas(app)
    if deployment is None:
        message = f"no Deployment {app.name} in namespace {estate.namespace}"
        return {"name": app.name, "state": "missing", "healthy": False, "image": None, "version": None,
                "revision": None,
                "replicas": {"desired": 0, "declared": declared, "ready": 0, "updated": 0, "available": 0},
                "restarts": 0, "lastRollout": None, "lastRolloutAgeSeconds": None,
                "rollout": {"state": "missing", "message": message}, "problems": [message], "routes": routes}
    spec, status = deployment["spec"], deployment.get("status") or {}
    image = rollout.image_of(spec["template"], app.name)
    mine = [p for p in pods if _selects(app, p)]
    problems = list(dict.fromkeys(problem for pod in mine for problem in rollout.pod_problems(pod)))
    progress = rollout.rollout(deployment)
    migration = next((p for p in problems if p.startswith(f"{rollout.MIGRATE} failed")), None)
    if migration and progress.state == "progressing":  # the migration is the rollout's health check
        progress = rollout.Rollout("failed", migration)
    desired, ready = spec.get("replicas", 1), status.get("readyReplicas", 0)
    if progress.state == "failed" and progress.message not in problems:
        problems.insert(0, progress.message)
    if progress.done and ready < desired and not problems:
        problems.append(f"{ready} of {desired} replicas ready")
    # Scaled down by hand, or by a restore that stopped the apps and never started them again.
    scaled_down = desired < declared
    if scaled_down:
        problems.insert(0, f"scaled to {desired}, the program declares {declared}: "
                           f"`kubectl -n {estate.namespace} scale deployment/{app.name} --replicas={declared}`")
    if progress.state == "failed":
        state = "failed"
    elif any("crash-looping" in p for p in problems):
        state = "crash-looping"
    elif scaled_down:
        state = "scaled-down"
    elif problems:
        state = "degraded"
    else:
        state = "ok" if progress.done else "progressing"
    last = rollout.last_rollout(deployment, sets)
    return {
        "name": app.name, "state": state, "healthy": state == "ok", "image": image, "version": rollout.tag_of(image),
        "revision": rollout.revision(deployment),
        "replicas": {"desired": desired, "declared": declared, "ready": ready,
                     "updated": status.get("updatedReplicas", 0), "available": status.get("availableReplicas", 0)},
        "restarts": rollout.restarts(mine), "lastRollout": iso(last),
        "lastRolloutAgeSeconds": int((now - last).total_seconds()) if last else None,
        "rollout": {"state": progress.state, "message": progress.message}, "problems": problems, "routes": routes,
    }


def _of_budget(node: dict, budget: capacity.Report, estate: Estate) -> bool:
    """Whether the live node is the one the budget is for: an agent registers under its name (k3s's
    node-name), the k3s host under its host name, with the configured private address (node-ip)."""
    if budget.instance_type:
        return node["metadata"]["name"] == budget.node
    addresses = ((node.get("status") or {}).get("addresses")) or []
    return any(a.get("type") == "InternalIP" and a.get("address") == estate.k3s_private_ip for a in addresses)


def memory_report(estate: Estate, nodes: list[dict]) -> dict:
    """Node conditions, and each node's allocatable memory against its budget (infra/capacity.py): the k3s
    host's, and with k3s agents each agent's, with the pods the budget places there."""
    budgets = capacity.nodes_of(estate.budget)
    facts = {"budget": {"allocatableMiB": sum(b.allocatable_mib for b in budgets),
                        "podLimitsMiB": sum(b.total_mib for b in budgets)}, "nodes": []}
    matched = {}  # budget's node -> the live node's facts
    for node in nodes:
        conditions = {c["type"]: c for c in (node.get("status") or {}).get("conditions") or []}
        budget = next((b for b in budgets if b.node not in matched and _of_budget(node, b, estate)), None)
        fact = {
            "name": node["metadata"]["name"],
            "memoryPressure": conditions.get("MemoryPressure", {}).get("status") == "True",
            "allocatableMiB": mib(((node.get("status") or {}).get("allocatable") or {}).get("memory", "0")),
        }
        if budget is not None:
            fact["budget"] = {"node": budget.node, "allocatableMiB": budget.allocatable_mib,
                              "podLimitsMiB": budget.total_mib}
            matched[budget.node] = fact
        facts["nodes"].append(fact)
    if not facts["nodes"]:
        return {"state": "missing", "ok": False, "message": "the cluster lists no node", **facts}
    several = len(budgets) > 1  # then each figure says which node it is
    parts, over, absent = [], [], []
    for budget in budgets:
        fact = matched.get(budget.node)
        if fact is None:
            where = (f"no node {budget.node}" if budget.instance_type
                     else f"no node with the k3s host's address {estate.k3s_private_ip}")
            absent.append(f"{capacity.node_label(budget)} is not in the cluster ({where})")
            continue
        parts.append(f"{fact['name'] + ': ' if several else ''}allocatable {fact['allocatableMiB']} MiB, the pods' "
                     f"limits {budget.total_mib} MiB (budget: {budget.allocatable_mib} MiB allocatable)")
        if fact["allocatableMiB"] < budget.total_mib:
            over.append(fact["name"])
    summary = "; ".join(parts + absent)
    pressed = [n["name"] for n in facts["nodes"] if n["memoryPressure"]]
    if pressed:
        return {"state": "pressure", "ok": False, "message": f"MemoryPressure on {', '.join(pressed)}; {summary}",
                **facts}
    if absent:
        return {"state": "missing", "ok": False, "message": summary, **facts}
    if over:
        where = f" on {', '.join(over)}" if several else ""
        return {"state": "overcommitted", "ok": False,
                "message": f"{summary}: the pods can use more than the kubelet allocates{where}", **facts}
    return {"state": "ok", "ok": True, "message": f"no memory pressure; {summary}", **facts}


# --- the report ------------------------------------------------------------------------------------------

def _check(probe: probes.Probe) -> dict:
    return {"state": probe.state, "ok": probe.ok, "message": probe.message, **probe.facts}


def start_probes(estate: Estate, options: Options, now: datetime.datetime) -> probes.Pending:
    calls = {}
    for name in estate.tls_names:
        address, port = probes.endpoint(name, estate.addresses[name], probes.HTTPS_PORT, options.connect_to)
        calls[f"tls {name}"] = (lambda n=name, a=address, p=port: probes.certificate(n, a, p, now, options.timeout))
    for record in estate.names:
        calls[f"dns {record.name}"] = (lambda r=record: probes.resolves(r.name, r.address, options.dns_server,
                                                                         options.timeout))
    calls["backup"] = lambda: probes.newest_backup(estate.bucket, estate.backup_prefix, estate.region, now,
                                                   options.timeout)
    calls["drill"] = lambda: probes.last_drill(estate.bucket, estate.stage.name, estate.region, now, options.timeout)
    return probes.Pending(calls)


def collect(cluster: Cluster, estate: Estate, options: Options, now: datetime.datetime) -> dict:
    pending = start_probes(estate, options, now)
    ns = estate.namespace
    deployments = {d["metadata"]["name"]: d for d in cluster.deployments(ns)}
    sets = cluster.replica_sets(ns)
    names = tuple(app.name for app in estate.apps)
    pods = cluster.pods(ns, labels={"app": names}) if names else []
    nodes = cluster.nodes()

    def late(key: str, error: Optional[BaseException]) -> probes.Probe:
        what, _, subject = key.partition(" ")
        facts = ({"name": subject, "address": estate.addresses[subject], "port": probes.HTTPS_PORT} if what == "tls"
                 else {"name": subject, "declared": estate.addresses[subject], "resolved": []} if what == "dns"
                 else {"bucket": estate.bucket, "prefix": estate.backup_prefix} if what == "backup"
                 else {"bucket": estate.bucket, "key": f"{estate.stage.name}/drill/latest.json"})
        if error is not None:
            return probes.Probe("error", f"{type(error).__name__}: {error}", facts)
        return probes.Probe("unreachable", f"no answer within {options.timeout:g} s", facts)

    found = pending.wait(options.timeout, late)
    apps = [app_report(app, estate, deployments.get(app.name), sets, pods, now) for app in estate.apps]
    certificates = [_check(found[f"tls {name}"]) for name in estate.tls_names]
    dns = [{**_check(found[f"dns {r.name}"]), "type": r.type} for r in estate.names]
    backup, drill = _check(found["backup"]), _check(found["drill"])
    memory = memory_report(estate, nodes)
    problems = [f"{a['name']}: {p}" for a in apps for p in a["problems"]]
    problems += [f"{a['name']}: rollout {a['rollout']['message']}" for a in apps
                 if a["state"] == "progressing"]
    problems += [f"backup: {backup['message']}"] if not backup["ok"] else []
    problems += [f"drill: {drill['message']}"] if not drill["ok"] else []
    problems += [f"certificate {c['name']}: {c['message']}" for c in certificates if not c["ok"]]
    problems += [f"dns {d['name']}: {d['message']}" for d in dns if not d["ok"]]
    problems += [f"memory: {memory['message']}"] if not memory["ok"] else []
    return {
        "schemaVersion": SCHEMA_VERSION, "stage": estate.stage.name, "namespace": ns, "cluster": cluster.server,
        "checkedAt": iso(now), "healthy": not problems, "problems": problems,
        "apps": apps, "backup": backup, "drill": drill, "certificates": certificates, "dns": dns, "memory": memory,
    }


# --- rendering -------------------------------------------------------------------------------------------

def render_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=True) + "\n"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]).rstrip() for row in rows]


def render_table(report: dict, paint=lambda state, text: text) -> str:
    """The report for people; `paint(state, text)` colours a state word (on a terminal)."""
    out = [f"{report['stage']} (namespace {report['namespace']}) at {report['cluster']}", ""]
    rows = [["APP", "VERSION", "READY", "RESTARTS", "ROLLED OUT", "STATE", "ROUTES"]]
    for a in report["apps"]:
        rows.append([a["name"], a["version"] or "-", f"{a['replicas']['ready']}/{a['replicas']['desired']}",
                     str(a["restarts"]), age(a["lastRolloutAgeSeconds"]) + (" ago" if a["lastRollout"] else ""),
                     a["state"], ", ".join(a["routes"])])
    lines = _table(rows)
    out.append(lines[0])
    for a, line in zip(report["apps"], lines[1:]):
        out.append(line.replace(f"  {a['state']}", f"  {paint(a['state'], a['state'])}", 1))
        out += [f"    {problem}" for problem in a["problems"]]
        if a["state"] == "progressing":
            out.append(f"    rollout: {a['rollout']['message']}")
    checks = [["CHECK", "SUBJECT", "STATE", "DETAIL"]]
    backup = report["backup"]
    detail = backup["message"] if not backup.get("key") else f"{backup['key'].rsplit('/', 1)[1]}: {backup['message']}"
    checks.append(["backup", f"s3://{backup['bucket']}/{backup['prefix']}", backup["state"], detail])
    drill = report["drill"]
    checks.append(["drill", f"s3://{drill['bucket']}/{drill['key']}", drill["state"], drill["message"]])
    checks += [["certificate", c["name"], c["state"], c["message"]] for c in report["certificates"]]
    checks += [["dns", d["name"], d["state"], d["message"]] for d in report["dns"]]
    memory = report["memory"]
    checks.append(["memory", ", ".join(n["name"] for n in memory["nodes"]) or "-", memory["state"], memory["message"]])
    out.append("")
    for row, line in zip(checks, _table(checks)):
        state = row[2]
        out.append(line if row is checks[0] else line.replace(f"  {state}", f"  {paint(state, state)}", 1))
    out.append("")
    if report["healthy"]:
        out.append(paint("ok", "healthy"))
    else:
        bad = [f"{a['name']} ({a['state']})" for a in report["apps"] if not a["healthy"]]
        bad += [f"{row[0]} {row[1]} ({row[2]})" for row in checks[1:] if row[2] != "ok"]
        out.append(paint("failed", "unhealthy: " + ", ".join(bad)))
    return "\n".join(out) + "\n"

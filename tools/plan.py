"""`make plan`: evaluate a stack offline and show what it declares.

Prints a summary for people (resources by component, the DNS table, the security group rules, the
host facts) and writes the whole plan as JSON to build/plan-<stack>.json, byte-identical for the same
inputs. Secrets appear only as [secret].
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from infra import capacity
from infra.settings import STAGES
from tools.offline import ROOT, Plan, evaluate

BUILD = ROOT / "build"


def short_type(token: str) -> str:
    return token.split(":")[-1]


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def components_section(plan: Plan) -> list[str]:
    children = defaultdict(list)
    for resource in plan.resources:
        children[resource.parent].append(resource)
    lines: list[str] = []

    def walk(parent, depth: int) -> None:
        for resource in sorted(children[parent], key=lambda r: (r.custom, r.type, r.name)):
            flags = [flag for flag, on in (("protected", resource.options["protect"]),
                                           (f"import {resource.options['import_id']}", resource.options["import_id"]))
                     if on]
            suffix = f"  [{', '.join(flags)}]" if flags else ""
            lines.append(f"{'  ' * depth}{short_type(resource.type)} {resource.name}{suffix}")
            walk(resource.urn, depth + 1)

    walk(None, 1)
    return [f"Resources by component ({len(plan.resources)})", *lines]


def dns_section(plan: Plan) -> list[str]:
    rows = sorted([r.inputs["name"], r.inputs["type"], ", ".join(r.inputs["records"]), str(r.inputs["ttl"])]
                  for r in plan.of_type("aws:route53/record:Record"))
    return ["DNS records", *table(["name", "type", "value", "ttl"], rows)] if rows else []


def security_section(plan: Plan) -> list[str]:
    groups = {r.urn: r.name for r in plan.of_type("aws:ec2/securityGroup:SecurityGroup")}
    rows = sorted([groups.get(r.parent, "?"), f"{r.inputs['ipProtocol']}/{r.inputs['fromPort']}",
                   r.inputs.get("cidrIpv4") or f"sg:{r.inputs.get('referencedSecurityGroupId')}",
                   r.inputs.get("description", "")]
                  for r in plan.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"))
    return ["Security group ingress (all else closed)", *table(["group", "port", "source", "why"], rows)] if rows else []


def hosts_section(plan: Plan) -> list[str]:
    rows = []
    for instance in plan.of_type("aws:ec2/instance:Instance"):
        i = instance.inputs
        metadata, root = i.get("metadataOptions", {}), i.get("rootBlockDevice", {})
        rows.append([instance.name, i["instanceType"], i.get("privateIp") or "(any)",
                     str(plan.outputs.get(f"{instance.name}PublicIp", "?")),
                     f"{root.get('volumeSize')} GB {root.get('volumeType')}"
                     f"{' encrypted' if root.get('encrypted') else ''}",
                     f"IMDSv2={'yes' if metadata.get('httpTokens') == 'required' else 'no'} "
                     f"hops={metadata.get('httpPutResponseHopLimit')}",
                     "yes" if instance.options["protect"] else "no",
                     instance.options["import_id"] or "-"])
    headers = ["host", "type", "private IP", "public IP", "root volume", "metadata", "protected", "import"]
    return ["Hosts", *table(headers, sorted(rows))] if rows else []


def capacity_section(plan: Plan) -> list[str]:
    return capacity.lines(capacity.estate_report(capacity.agents_in_plan(plan.document())))


def known_after_deploy_section(plan: Plan) -> list[str]:
    """The stand-ins this summary shows for values only a deployment can know (the JSON shows them
    as "(known after deploy)"), and how many places each reached."""
    secret = {(r.urn, prop) for r in plan.resources for prop in r.options["additional_secret_outputs"]}
    stand_ins = defaultdict(list)
    for value, origins in plan.placeholders.items():
        if not secret & set(origins):  # a secret's stand-in is no more shown than a secret
            stand_ins[origins].append(value.splitlines()[0] + (" …" if "\n" in value else ""))
    rows = []
    for entry in plan.document()["knownAfterDeploy"]:
        origins = tuple((o["urn"], o["property"]) for o in entry["standsFor"])
        # The mocks give same-named resources the same stand-in: "k3s id (Eip, Instance, ...)".
        names = dict.fromkeys(f"{urn.split('::')[-1]} {prop}" for urn, prop in origins)
        types = list(dict.fromkeys(short_type(urn.split("::")[-2]) for urn, _ in origins))
        types = types if len(types) <= 3 else [*types[:2], f"{len(types) - 2} more"]
        what = f"{' or '.join(names)} ({', '.join(types)})"
        rows.append([what, ", ".join(sorted(stand_ins[origins]))[:60] or "[secret]",
                     str(len({use["urn"] for use in entry["usedIn"]}))])
    title = "Known only after deploy (stand-ins above; (known after deploy) in the JSON)"
    return [title, *table(["value of", "stand-in", "used by"], sorted(rows))] if rows else []


SECTIONS = [components_section, dns_section, security_section, hosts_section, capacity_section,
            known_after_deploy_section]


def summary(plan: Plan) -> str:
    blocks = [f"Offline plan of stack '{plan.stack}' (Pulumi mocks, no cloud calls)"]
    blocks += ["\n".join(lines) for lines in (section(plan) for section in SECTIONS) if lines]
    blocks.append("Stack outputs\n" + "\n".join(f"  {k} = {v}" for k, v in sorted(plan.outputs.items())))
    return "\n\n".join(blocks) + "\n"


def write_json(plan: Plan, directory: Path | None = None) -> Path:
    directory = directory or BUILD
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"plan-{plan.stack}.json"
    path.write_text(plan.to_json())
    return path


def main(argv: list[str] | None = None) -> int:
    import pulumi
    from tools.stackfile import StackFileError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", default="prod", choices=list(STAGES))
    parser.add_argument("--json-only", action="store_true", help="write the JSON plan without the summary")
    args = parser.parse_args(argv)
    try:
        plan = evaluate(args.stack)
    except (pulumi.RunError, StackFileError) as error:
        # run_pulumi_func re-raises the program's own exception once its RPCs are done. The Pulumi CLI
        # prints a RunError as its message alone (pulumi-language-python-exec), and so does the plan.
        print(error, file=sys.stderr)
        return 2
    path = write_json(plan)
    if not args.json_only:
        sys.stdout.write(summary(plan))
    print(f"\nFull plan: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

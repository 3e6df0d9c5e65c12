"""make discover STACK=prod|qa: what of the estate already runs, read without changing anything.

Orchestrates the three sources (tools/discover_aws.py, discover_cluster.py, discover_hosts.py), each
looking for the names tools/discover_targets.py takes from the stack's config and offline plan, and
writes one deterministic JSON file: the same live estate gives the same bytes.

The file (schema 1; keys sorted):
  sources   {aws|cluster|hosts: {"status": "read"|"skipped"|"error", "why"|"error": ...}}
  aws       region, account; instances.{k3s,vpn} (lookup, subnet, rootVolume, securityGroups.<sg>.ingress[],
            metadataOptions, elasticIp.association, ...); iam.{users,roles,instanceProfiles,policies,
            oidcProviders}; keyPairs; buckets; ses.{identities.<domain>.{dkim,mailFrom},configurationSets};
            route53.{zones.<name>.id, records[]}        (null when skipped)
  cluster   server; objects["<Kind> <namespace>/<name>"] (kind facts; HelmChartConfig: deployController)
  hosts     k3s.{k3s,postgres}, vpn.wireguard; each with address and reached (or error)
  secrets   [{where, configKey|null, command|null}]: where a secret lives, never its value
  imports   [{at, type, id}]: every `import` above, `at` its path in the file
Every object that exists has "exists": true and "import": {"type": <Pulumi type token>, "id": <import ID>}
(null for what is never imported: a *Patch, an object the stack does not declare); a declared name
not found is {"exists": false}; a fact the credentials could not read is {"error": "..."}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, TextIO

from infra.settings import REGION, STAGES
from tools.offline import PROJECT, ROOT

SCHEMA = 1

DESCRIPTION = f"""\
Finds what of the Katforge estate already runs, so the first `pulumi up` can import it instead of
creating it over again. Read-only, with your own credentials: AWS through boto3's usual environment,
profile or SSO (it honours AWS_ENDPOINT_URL; region {REGION}); the cluster through --kubeconfig,
$KUBECONFIG or ~/.kube/katforge-config; the hosts over SSH (OpenSSH in batch mode, as --ssh-user with
--ssh-key or your agent, root through `sudo -n`), where infra/host/discover-k3s.sh and discover-vpn.sh
run from stdin. It looks for every name the stack declares (its config and offline plan): the two hosts
(the k3s host by katforge:k3sPrivateIp, the VPN host by katforge:vpnPublicIp), their Elastic IPs, subnets,
root volumes, security groups and rules; IAM users, roles, policies, the key pair, the GitHub OIDC
provider and the bucket; SES and every DNS record the program manages; the Kubernetes objects, who owns
HelmChartConfig kube-system/traefik, Traefik's PVC; k3s, PostgreSQL and WireGuard on the hosts.

It writes build/discovered-<stack>.json: every object found with the ID `pulumi import` expects (under
"import", all of them listed in "imports"), every name not found as {{"exists": false}}, and what each
source could not read. No secret value is ever printed or written: where one is found live, the file
says where, and this command prints the `pulumi config set --secret` command that puts it in the stack.
Exits 1 when a source could not be read (the file says which and why), 0 otherwise.
"""


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.discover", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", required=True, choices=sorted(STAGES), help="the stack whose names to look for")
    parser.add_argument("--no-aws", action="store_true", help="skip AWS")
    parser.add_argument("--no-cluster", action="store_true", help="skip the cluster")
    parser.add_argument("--no-hosts", action="store_true", help="skip the hosts")
    parser.add_argument("--kubeconfig", metavar="PATH", help="default: $KUBECONFIG, else ~/.kube/katforge-config")
    parser.add_argument("--ssh-key", metavar="PATH", help="private key for SSH (default: your agent and ssh config)")
    parser.add_argument("--ssh-user", default="ubuntu", help="SSH user on both hosts (default ubuntu)")
    parser.add_argument("--ssh-port", type=int, metavar="N", help="SSH port (default: your ssh config, else 22)")
    parser.add_argument("--ssh-option", action="append", default=[], metavar="OPTION",
                        help="an ssh -o option, e.g. ProxyJump=ubuntu@vpn.katforge.com (repeatable)")
    parser.add_argument("--k3s-host", metavar="ADDRESS", help="default: katforge:k3sPublicIp")
    parser.add_argument("--vpn-host", metavar="ADDRESS", help="default: katforge:vpnPublicIp")
    parser.add_argument("--host-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the host scripts, e.g. K3S_DATA_DIR=/srv/k3s when k3s runs with "
                             "--data-dir (their headers list them; repeatable)")
    parser.add_argument("--out", metavar="PATH", help="default: build/discovered-<stack>.json")
    args = parser.parse_args(argv)
    for setting in args.host_env:
        if "=" not in setting or not setting.split("=", 1)[0].isidentifier():
            parser.error(f"--host-env {setting!r}: expected NAME=VALUE")
    return args


def imports(document: Any, path: str = "") -> Iterator[dict]:
    """Every `import` in the document, with where it sits."""
    if isinstance(document, dict):
        found = document.get("import")
        if isinstance(found, dict):
            yield {"at": path, **found}
        for key, value in document.items():
            yield from imports(value, f"{path}.{key}" if path else key)
    elif isinstance(document, list):
        for i, value in enumerate(document):
            yield from imports(value, f"{path}[{i}]")


def command(stack: str, secret: dict) -> Optional[str]:
    if not secret.get("configKey"):
        return None
    base = f"pulumi config set --secret {PROJECT}:{secret['configKey']} --stack {stack}"
    return f"{base} < {secret['from']}" if secret.get("from") else base


def read_aws(targets) -> dict:
    from botocore.exceptions import BotoCoreError, ClientError

    from tools import discover_aws
    try:
        return {"status": "read", "facts": discover_aws.discover(targets)}
    except (BotoCoreError, ClientError) as error:
        return {"status": "error", "error": f"{type(error).__name__}: {error}"}


def read_cluster(targets, kubeconfig: Optional[str]) -> dict:
    import httpx2
    from lightkube import ApiError, ConfigError

    from tools import discover_cluster
    path = discover_cluster.kubeconfig_path(kubeconfig, dict(os.environ))
    try:
        return {"status": "read", "facts": discover_cluster.discover(targets, path)}
    except (ApiError, ConfigError, httpx2.HTTPError, OSError) as error:
        return {"status": "error", "error": f"{type(error).__name__}: {error}", "kubeconfig": str(path)}


def read_hosts(targets, args: argparse.Namespace) -> dict:
    from tools import discover_hosts
    ssh = discover_hosts.Ssh(
        user=args.ssh_user, key=discover_hosts.key_path(args.ssh_key), port=args.ssh_port,
        options=tuple(args.ssh_option), host_env=tuple(tuple(s.split("=", 1)) for s in args.host_env),
        addresses={role: address for role, address in (("k3s", args.k3s_host), ("vpn", args.vpn_host)) if address})
    hosts, secrets = discover_hosts.discover(targets, ssh)
    unreached = sorted(role for role, host in hosts.items() if not host.get("reached"))
    status = {"status": "error", "error": "not reached: " + ", ".join(unreached)} if unreached else {"status": "read"}
    return {**status, "facts": hosts, "secrets": secrets}


def discover(args: argparse.Namespace) -> dict:
    from tools.discover_targets import targets as targets_of
    targets = targets_of(args.stack)
    document: dict[str, Any] = {"schema": SCHEMA, "stack": args.stack, "sources": {}}
    secrets: list[dict] = []
    for source, skipped, reader in (("aws", args.no_aws, lambda: read_aws(targets)),
                                    ("cluster", args.no_cluster, lambda: read_cluster(targets, args.kubeconfig)),
                                    ("hosts", args.no_hosts, lambda: read_hosts(targets, args))):
        if skipped:
            document["sources"][source] = {"status": "skipped", "why": f"--no-{source}"}
            document[source] = None
            continue
        result = reader()
        facts = result.pop("facts", None)
        if source == "cluster" and facts:
            secrets += facts.pop("secrets")
        secrets += result.pop("secrets", [])
        document["sources"][source] = result
        document[source] = facts
    document["secrets"] = sorted(({**s, "command": command(args.stack, s)} for s in secrets),
                                 key=lambda s: (s.get("configKey") or "~", s["where"]))
    document["imports"] = sorted(imports({k: document[k] for k in ("aws", "cluster", "hosts")}),
                                 key=lambda i: i["at"])
    return document


def summary(document: dict, out: Path) -> str:
    lines = [f"discover {document['stack']}:"]
    for source, state in document["sources"].items():
        lines.append(f"  {source}: {state['status']}" + (f" ({state.get('error') or state.get('why')})"
                                                          if state["status"] != "read" else ""))
    lines.append(f"wrote {out}: {len(document['imports'])} objects to import, "
                 f"{len(document['secrets'])} secrets found live (values never shown)")
    to_set = [s for s in document["secrets"] if s["command"]]
    if to_set:
        lines.append("Put these live secrets in the stack (each command prompts for the value, or reads the file):")
        lines += [f"  {s['command']}    # {s['where']}" for s in to_set]
    others = [s for s in document["secrets"] if not s["command"]]
    if others:
        lines.append("Live secrets no config key holds (they stay where they are; see the JSON):")
        lines += [f"  {s['where']}" for s in others]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None, stdout: Optional[TextIO] = None) -> int:
    args = parse(argv)
    document = discover(args)
    out = Path(args.out) if args.out else ROOT / "build" / f"discovered-{args.stack}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    print(summary(document, out), file=stdout or sys.stdout)
    failed = [s for s, state in document["sources"].items() if state["status"] == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

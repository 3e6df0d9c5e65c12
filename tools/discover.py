"""make discover STACK=prod|qa: what of the estate already runs, read without changing anything there, and
set in the stack file as the config that adopts it (import lines, live facts).

Orchestrates the three sources (tools/discover_aws.py, discover_cluster.py, discover_hosts.py), each
looking for the names tools/discover_targets.py takes from the stack's config and offline plan, and
writes one deterministic JSON file: the same live estate gives the same bytes.

The file (schema 2; keys sorted):
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
import ipaddress
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, TextIO

from infra.settings import MOVING_TAGS, REGION, STAGES, SettingsError
from tools.offline import PROJECT, ROOT, NotFound, Plan, effective_config, project_config_schema
from tools.stackfile import StackFileError

SCHEMA = 2  # 2: the k3s unit file by file, config.yaml's lines, pg_hba's text, sshd

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
source could not read. Then it sets in Pulumi.<stack>.yaml what the program needs to take the live estate
over without replacing or cutting off anything (--no-write-config leaves the file alone), and prints
each key it changed, for you to review before `make preflight`: katforge:imports (one line per live object
the stack declares), the root volumes' size, type and encryption, the VPN host's subnet, the live
security groups to keep attached, the zone IDs, mailFromMxFailure, the WireGuard port, client network
and peers, k3sSecretsEncryption, and imageTags from the running Deployments. Only keys whose source was
read change; a key you set to something the live estate allows (a larger volume, another volume type) is
kept. A second run over the same estate changes no byte. No secret value is ever printed or written:
where one is found live, the JSON says where, and this command prints the `pulumi config set --secret`
command that puts it in the stack. Exits 1 when a source could not be read (the file says which and
why) or the program refuses the config it wrote (the line says why), 0 otherwise.
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
    parser.add_argument("--stack-file", metavar="PATH", help="the stack file to set what was found in "
                                                             "(default: Pulumi.<stack>.yaml of the repository)")
    parser.add_argument("--no-write-config", dest="write_config", action="store_false",
                        help="only write the JSON; leave the stack file as it is")
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


def stack_file(args: argparse.Namespace) -> Path:
    return Path(args.stack_file) if args.stack_file else ROOT / f"Pulumi.{args.stack}.yaml"


def discover(args: argparse.Namespace) -> dict:
    from tools.adoption import plan_against
    from tools.discover_targets import targets as targets_of
    # The names to look for come from the stack file's plan, against the account it names.
    targets = targets_of(args.stack, plan_against(args.stack, stack_file(args)))
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


# --- the stack file: what was found, as config ------------------------------------------------------

def _read(document: dict, source: str) -> bool:
    return document["sources"].get(source, {}).get("status") == "read"


def _keep_current(current: dict[str, Any], key: str, live: Any, allowed) -> Any:
    """The stack file's own value where the live estate allows it (`allowed(own, live)`), else live."""
    own = current.get(f"{PROJECT}:{key}")
    try:
        return own if own is not None and allowed(own, live) else live
    except ValueError:
        return live


def host_facts(document: dict, current: dict[str, Any]) -> dict[str, Any]:
    """What the hosts and their volumes are, read off AWS: nothing a plan is needed for."""
    values: dict[str, Any] = {}
    instances = (document.get("aws") or {}).get("instances") or {}
    for role, instance in sorted(instances.items()):
        volume = instance.get("rootVolume") if instance.get("exists") else None
        if not volume:
            continue
        # Encryption cannot change on an instance and a volume cannot shrink; a larger size or another
        # type the stack file names is an update in place, the operator's to choose.
        values[f"{role}RootVolumeEncrypted"] = bool(volume["encrypted"])
        values[f"{role}RootVolumeGb"] = int(_keep_current(current, f"{role}RootVolumeGb", volume["sizeGb"],
                                                          lambda own, live: int(own) >= live))
        values[f"{role}RootVolumeType"] = _keep_current(current, f"{role}RootVolumeType", volume["type"],
                                                        lambda own, live: True)
        if role == "vpn":
            values["vpnSubnetId"] = instance["subnet"]["id"]
    zones = ((document.get("aws") or {}).get("route53") or {}).get("zones") or {}
    if zones:
        found = {zone: f["id"] for zone, f in zones.items() if f.get("exists")}
        configured = [line for line in current.get(f"{PROJECT}:zoneIds") or [] if line.split("=")[0] not in found]
        values["zoneIds"] = configured + [f"{zone}={zone_id}" for zone, zone_id in sorted(found.items())]
    return values


def peer_name(comment: Optional[str], taken: set[str]) -> Optional[str]:
    """A live peer's comment as a peer name (a lowercase label), or None."""
    name = re.sub(r"[^a-z0-9]+", "-", (comment or "").strip().lower()).strip("-")[:63].strip("-")
    return name if name and name not in taken else None


def wireguard_facts(document: dict, current: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The live WireGuard server's port, client network and peers, so wireguard.sh keeps every client."""
    from tools.adoption import peer_allowed_ips
    wg = ((document.get("hosts") or {}).get("vpn") or {}).get("wireguard")
    if not wg:
        return {}, []
    values: dict[str, Any] = {}
    notes: list[str] = []
    running = wg.get("running") or {}
    port = running.get("listenPort") or wg["config"].get("listenPort")
    if port:
        values["wireguardPort"] = int(port)
    address = running.get("address") or wg["config"].get("address")
    if address:
        values["vpnClientCidr"] = str(ipaddress.ip_interface(address).network)
    lines = list(current.get(f"{PROJECT}:wireguardPeers") or [])
    by_key = {line.split(",")[1]: i for i, line in enumerate(lines) if line.count(",") == 2}
    taken = {line.split(",")[0] for line in lines}
    unnamed = 0
    for peer in wg.get("peers") or []:
        allowed, keepable = peer_allowed_ips(peer)
        if not keepable:
            notes.append(f"live WireGuard peer {peer['publicKey']} allows {allowed or 'nothing'}, which a "
                         "wireguardPeers line (one /32) cannot say: make preflight names it")
            continue
        if peer["publicKey"] in by_key:
            i = by_key[peer["publicKey"]]
            name, key, _ = lines[i].split(",")
            lines[i] = f"{name},{key},{allowed}"
            continue
        name = peer_name(peer.get("name"), taken)
        while name is None:
            unnamed += 1
            name = f"live-{unnamed}" if f"live-{unnamed}" not in taken else None
        taken.add(name)
        lines.append(f"{name},{peer['publicKey']},{allowed}")
    values["wireguardPeers"] = lines
    return values, notes


def k3s_facts(document: dict, effective: dict[str, str]) -> dict[str, Any]:
    status = ((((document.get("hosts") or {}).get("k3s") or {}).get("k3s") or {}).get("secretsEncryption") or {})
    # Turning encryption on for a running cluster is the operator's choice (k3sEncryptExistingSecrets).
    opted_in = effective.get(f"{PROJECT}:k3sEncryptExistingSecrets") == "true"
    if status.get("status") in ("Enabled", "Disabled") and not opted_in:
        return {"k3sSecretsEncryption": status["status"] == "Enabled"}
    return {}


def planned_facts(plan: Plan, document: dict, current: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """What needs the plan: the import lines, the groups to keep, MAIL FROM's fallback, image tags."""
    from tools import adoption
    values: dict[str, Any] = {}
    notes: list[str] = []
    found = adoption.matches(plan, document)
    adoptable = set(plan.adoptable)
    lines = {}
    for line in current.get(f"{PROJECT}:imports") or []:
        key, _, value = line.partition("=")
        if key in adoptable:
            lines[key] = value
        else:
            notes.append(f"dropped the import line {line}: no resource of this stack takes it")
    for m in found:
        if m.key in adoptable and m.known:
            if m.import_id:
                lines[m.key] = m.import_id
            else:
                lines.pop(m.key, None)
    if _read(document, "aws") or _read(document, "cluster"):
        values["imports"] = [f"{key}={value}" for key, value in sorted(lines.items())]
    if _read(document, "aws"):
        for host, groups in adoption.groups_to_keep(plan, document).items():
            attached = set(document["aws"]["instances"][host].get("securityGroups") or {})
            kept = {g for g in current.get(f"{PROJECT}:{host}KeepSecurityGroups") or [] if g in attached}
            values[f"{host}KeepSecurityGroups"] = sorted(kept | set(groups))
    for m in found:
        if m.resource.type == "aws:ses/mailFrom:MailFrom" and m.known:
            values["mailFromMxFailure"] = ("RejectMessage" if adoption.mail_from_verified(m)
                                           and m.live.get("behaviorOnMxFailure") == "RejectMessage"
                                           else "UseDefaultValue")
        if m.resource.type == "kubernetes:apps/v1:Deployment" and m.exists:
            app = m.inputs["metadata"]["name"]
            image = (m.live.get("images") or {}).get(app) or ""
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            if not tag or "@" in image or tag in MOVING_TAGS:
                notes.append(f"Deployment {m.at.rsplit(' ', 1)[1]} runs {image or 'no image'}: no release tag "
                             f"to start it at; set imageTags for {app} by hand")
                continue
            values.setdefault("imageTags", [])
            values["imageTags"].append(f"{app}={tag}")
    if "imageTags" in values:
        # The tags of apps not running live stay as the stack file has them.
        named = {line.split("=")[0] for line in values["imageTags"]}
        values["imageTags"] = [line for line in current.get(f"{PROJECT}:imageTags") or []
                               if line.split("=")[0] not in named] + values["imageTags"]
    return values, notes


@dataclass
class ConfigWrite:
    """What setting the discovered facts in a stack file did."""
    path: Path
    before: dict[str, Any]  # the file's config before
    values: dict[str, Any]  # every key set, whether it changed or not
    changed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    refusal: Optional[str] = None  # the program's one line, when it stops with the file as written

    def summary(self) -> str:
        lines = [f"{self.path.name}: " + (f"set {len(self.changed)} keys from what runs live (review them, then "
                                          "make preflight):" if self.changed
                                          else "already holds what runs live: nothing changed")]
        for key in self.changed:
            old, new = self.before.get(key), self.values[key]
            if isinstance(new, list):
                added = [f"\n    + {item}" for item in new if item not in (old or [])]
                gone = [f"\n    - {item}" for item in old or [] if item not in new]
                lines.append(f"  {key}: {len(new)} line{'' if len(new) == 1 else 's'}" + "".join(added + gone))
            else:
                shown = new if isinstance(new, str) else json.dumps(new)
                lines.append(f"  {key} = {shown}" + (f" (was {old})" if old is not None else ""))
        lines += [f"  note: {note}" for note in self.notes]
        if self.refusal:
            lines.append(f"the program refuses this config: {self.refusal}")
        return "\n".join(lines)


def write_config(stack: str, document: dict, path: Path) -> ConfigWrite:
    """Set what was found in the stack file at `path`. What needs no plan comes first; then the plan with
    no import lines gives the lines and the groups to keep, and the plan with all of it, in which imported
    addresses are known, gives them again as they stand."""
    from tools import adoption, stackfile
    schema = project_config_schema()
    current = stackfile.read(path, schema)
    effective, _ = effective_config(stack, adoption.stack_file_config(stack, path))
    values: dict[str, Any] = {}
    notes: list[str] = []
    if _read(document, "aws"):
        values.update(host_facts(document, current))
    if _read(document, "hosts"):
        wireguard, notes = wireguard_facts(document, current)
        values.update(wireguard)
    refusal, planned_notes = None, []
    extra = {f"{PROJECT}:{key}": value for key, value in values.items()}
    for with_imports in (False, True):
        overrides = extra if with_imports else {**extra, f"{PROJECT}:imports": []}
        try:
            plan = adoption.plan_against(stack, path, document, overrides)
        except (SettingsError, StackFileError, NotFound) as error:
            refusal = str(error)
            break
        planned, planned_notes = planned_facts(plan, document, current)
        if _read(document, "hosts") and any(r.name == "k3s" for r in plan.of_type(adoption.INSTANCE)):
            planned.update(k3s_facts(document, effective))  # the stack that installs k3s (qa reads PostgreSQL)
        extra.update({f"{PROJECT}:{key}": value for key, value in planned.items()})
    # Only keys the project declares (one the program no longer reads stays out), and none that would
    # only repeat its default.
    wanted = {key: value for key, value in sorted(extra.items()) if key.split(":", 1)[1] in schema
              and (key in current or value != schema[key.split(":", 1)[1]].get("default"))}
    changed = stackfile.write(path, wanted, schema)
    return ConfigWrite(path, current, wanted, changed, notes + planned_notes, refusal)


def main(argv: Optional[list[str]] = None, stdout: Optional[TextIO] = None) -> int:
    args = parse(argv)
    stdout = stdout or sys.stdout
    document = discover(args)
    out = Path(args.out) if args.out else ROOT / "build" / f"discovered-{args.stack}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    print(summary(document, out), file=stdout)
    failed = [s for s, state in document["sources"].items() if state["status"] == "error"]
    if args.write_config:
        try:
            written = write_config(args.stack, document, stack_file(args))
        except StackFileError as error:
            print(f"{error}: nothing was set", file=stdout)
            return 1
        print(written.summary(), file=stdout)
        failed += ["config"] if written.refusal else []
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

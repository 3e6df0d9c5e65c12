"""`make preflight` against the simulated estate (tests/discovered.py: moto's live account, the local
Kubernetes API, the fake hosts over real sshd): it fails before discovery writes the config, passes with
no hazard after it (and the runbook's host steps), and shows every live stateful object as an import;
an empty account plans as creates. Then one test per hazard: each is found in a broken estate or
config and gone once fixed as its line says."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightkube", reason="lightkube is not installed: make test must install requirements-tools.txt")

from tests.discovered import stack_copy
from tools import adoption, preflight, stackfile
from tools.offline import ROOT, project_config_schema

pytest_plugins = ["tests.discovered"]

SCHEMA = project_config_schema()
# Each default as a stack file reads: a scalar as its text, a list as it is.
DEFAULTS = {f"katforge:{key}": value if isinstance(value, (list, str)) else json.dumps(value)
            for key, value in ((key, decl["default"]) for key, decl in SCHEMA.items() if "default" in decl)}
# What a first `up` must import rather than create: the hosts, their addresses, every account-unique name
# that exists live, and the cluster's objects that exist.
STATEFUL = ("Instance:k3s", "Instance:vpn", "Eip:k3s", "Eip:vpn", "EipAssociation:k3s", "EipAssociation:vpn",
            "DomainIdentity:katforge.com", "ConfigurationSet:katforge", "User:ses-sender", "User:dns-challenge",
            "KeyPair:operators", "OpenIdConnectProvider:github-actions", "Namespace:cluster-ci-namespace",
            "Deployment:apps-api", "Deployment:apps-web", "Service:apps-api-service", "Secret:apps-ghcr")


class Plans:
    """Plans by stack-file config and account, evaluated once each: most hazards change only the
    discovered facts, which a plan does not depend on."""

    def __init__(self):
        self.cache: dict[str, object] = {}

    def __call__(self, stack_file: Path, document: dict):
        # The config as the program sees it: a key set to its default is the key left out.
        config = {**DEFAULTS, **stackfile.read(stack_file, SCHEMA)}
        key = json.dumps([config, adoption.cloud_of(document)], sort_keys=True)
        if key not in self.cache:
            self.cache[key] = adoption.plan_against("prod", stack_file, document)
        return self.cache[key]


@pytest.fixture(scope="session")
def plans() -> Plans:
    return Plans()


@pytest.fixture(scope="session")
def passing(adoption) -> tuple[dict, bytes]:
    """The discovered estate after the runbook, and the stack file discovery wrote for it."""
    return adoption.runs[2].document, adoption.after_last


@pytest.fixture
def stack(tmp_path, passing) -> Path:
    """A copy of the passing stack file, to break and fix."""
    path = stack_copy(tmp_path)
    path.write_bytes(passing[1])
    return path


def assess(plans: Plans, stack_file: Path, document: dict, waived=()) -> preflight.Report:
    return preflight.assess(plans(stack_file, document), document, waived)


def only(report: preflight.Report, text: str) -> str:
    """The one hazard line that holds `text`, and no other hazard."""
    assert len(report.hazards) == 1 and text in report.hazards[0], report.hazards
    return report.hazards[0]


def setting(path: Path, **values) -> Path:
    stackfile.write(path, {f"katforge:{k}": v for k, v in values.items()}, SCHEMA)
    return path


# --- the runbook, end to end ------------------------------------------------------------------------

def test_preflight_fails_before_discovery_writes_the_config(adoption, tmp_path, capsys):
    untouched = stack_copy(tmp_path)
    discovered = tmp_path / "discovered.json"
    discovered.write_bytes(adoption.runs[0].json)
    status = preflight.main(["--stack", "prod", "--discovered", str(discovered), "--stack-file", str(untouched)])
    out = capsys.readouterr().out
    assert status == 1
    assert "hazard: the program stops before any change" in out


def test_after_discovery_only_what_the_runbook_does_on_the_hosts_is_left(adoption, plans, tmp_path, fake_hosts):
    written = stack_copy(tmp_path)
    written.write_bytes(adoption.written)
    report = assess(plans, written, adoption.runs[1].document)
    md5, hba, restart, k3s = report.hazards
    refuses = "PostgreSQL: pg-configure.sh refuses, so pulumi up stops there (after the AWS changes): refusing to "
    assert md5.startswith(refuses) and f"\\password {fake_hosts.roles['md5']}'" in md5
    assert hba.startswith(refuses) and "line 117: local all all trust" in hba
    assert "pulumi config set katforge:postgresDropLiveHbaRules true" in hba
    assert "pulumi config set katforge:postgresAllowRestart true --stack prod" in restart
    assert k3s.startswith("k3s host:") and "pulumi config set katforge:k3sReplaceLiveFlags true" in k3s


def test_preflight_passes_after_discovery_and_the_runbook(adoption, capsys, tmp_path):
    discovered = tmp_path / "discovered.json"
    discovered.write_bytes(adoption.runs[2].json)
    status = preflight.main(["--stack", "prod", "--discovered", str(discovered),
                             "--stack-file", str(adoption.stack_file)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "hazard:" not in out and out.rstrip().endswith("reaches every host")


def test_every_live_stateful_resource_is_imported(adoption, plans, passing):
    report = assess(plans, adoption.stack_file, passing[0])
    ops = {row.resource: row.op for row in report.rows}
    assert {key: ops.get(key) for key in STATEFUL} == {
        key: ops[key] for key in STATEFUL if ops.get(key) in ("import unchanged", "import then update")}
    assert not report.of("replace") and not report.of("collision")
    # The live hosts take the program's settings in place (not their root volumes: those stay as they are).
    assert "metadataOptions.httpTokens optional → required" in report.row("Instance:k3s").detail
    assert "rootBlockDevice" not in report.row("Instance:vpn").detail.replace("rootBlockDevice.deleteOnTermination", "")
    assert report.row("HelmChartConfig:cluster-traefik-config").op == "risk"
    # What the live users were granted beyond the program's policy goes with the first up: the row says so.
    assert report.row("User:dns-challenge").detail.endswith(
        "; removes live policies the program does not declare: AmazonRoute53FullAccess")
    assert report.row("User:ses-sender").detail.endswith("; removes live policies the program does not declare: "
                                                         "ses-send")
    # Live records are taken over in place (an UPSERT), with their TTL.
    assert report.row("Record:katforge.com-a").detail == "takes over the live one in place: ttl 3600 → 300"


def test_an_empty_account_plans_every_resource_as_a_create(greenfield, plans):
    path = greenfield.stack_file  # as discovery wrote it
    report = assess(plans, path, greenfield.document)
    assert {row.op for row in report.rows} == {"create"}
    # A greenfield has no VPN to come through yet: the bootstrap reaches both new hosts from the operator's
    # address only, so adminCidrs must name it (README, first deployment, step 3).
    assert [h.split(":")[0] for h in report.hazards] == ["k3s host", "vpn host"]
    assert assess(plans, setting(path, adminCidrs=["198.51.100.7/32"]), greenfield.document).hazards == []


# --- one test per hazard ----------------------------------------------------------------------------

def test_a_protected_resource_that_would_be_replaced(plans, stack, passing):
    report = assess(plans, setting(stack, k3sRootVolumeEncrypted=True), passing[0])
    line = only(report, "Instance:k3s: importing it would replace it (rootBlockDevice.encrypted (live false, planned "
                        "true)), protected, so pulumi up stops with an error midway")
    assert "pulumi config set katforge:k3sRootVolumeEncrypted false --stack prod" in line
    assert report.row("Instance:k3s").op == "replace"
    assert assess(plans, setting(stack, k3sRootVolumeEncrypted=False), passing[0]).hazards == []


def test_a_root_volume_that_would_shrink(plans, stack, passing):
    report = assess(plans, setting(stack, vpnRootVolumeGb=8), passing[0])
    only(report, "Instance:vpn: the root volume would shrink from 20 GB to 8 GB, which EBS refuses midway: "
                 "pulumi config set katforge:vpnRootVolumeGb 20 --stack prod")
    assert assess(plans, setting(stack, vpnRootVolumeGb=20), passing[0]).hazards == []


def test_a_create_that_collides_with_a_live_name(plans, stack, passing):
    document = copy.deepcopy(passing[0])  # a role of the program's name made by hand since
    document["aws"]["iam"]["roles"]["katforge-github-deploy"] = {
        "exists": True, "import": {"type": "aws:iam/role:Role", "id": "katforge-github-deploy"}}
    report = assess(plans, stack, document)
    only(report, "Role:katforge-github-deploy: katforge-github-deploy exists live, so creating it fails: run make "
                 "discover (it writes the import line)")
    assert report.row("Role:katforge-github-deploy").op == "collision"
    assert assess(plans, stack, passing[0]).hazards == []  # or deleted by hand


def test_an_adopted_key_pair_keeps_the_text_ec2_gives_its_key(plans, stack, passing):
    # EC2 returns the key with a comment of its own: imported as it is, the pair would be replaced for a comment.
    live = passing[0]["aws"]["keyPairs"]["katforge-operators"]["publicKey"]
    planned = plans(stack, passing[0]).named("operators", "aws:ec2/keyPair:KeyPair").inputs["publicKey"]
    assert live != planned and preflight.key_material(live) == preflight.key_material(planned)
    report = assess(plans, stack, passing[0])
    assert report.row("KeyPair:operators").op == "import unchanged" and report.hazards == []


def test_a_live_key_pair_that_holds_another_key(plans, stack, passing):
    document = copy.deepcopy(passing[0])
    pair = document["aws"]["keyPairs"]["katforge-operators"]
    pair["publicKey"] = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGFub3RoZXIta2V5LW9mLXRoZS1vcGVyYXRvcnMtMDA katforge-operators"
    line = only(assess(plans, stack, document), "KeyPair:operators: the live key pair katforge-operators holds another "
                                                f"key ({pair['fingerprint']}) than katforge:sshPublicKey")
    assert "aws ec2 delete-key-pair --key-name katforge-operators" in line
    # The pair deleted by hand and discovery run again (no import line): the first up creates it.
    document["aws"]["keyPairs"]["katforge-operators"] = {"exists": False}
    imports = [line for line in stackfile.read(stack, SCHEMA)["katforge:imports"] if not line.startswith("KeyPair:")]
    report = assess(plans, setting(stack, imports=imports), document)
    assert report.hazards == [] and report.row("KeyPair:operators").op == "create"


def test_a_kubernetes_object_that_exists_but_is_not_imported(plans, stack, passing):
    document = copy.deepcopy(passing[0])
    document["cluster"]["objects"]["NetworkPolicy default/default-deny"] = {"exists": True, "import": {
        "type": "kubernetes:networking.k8s.io/v1:NetworkPolicy", "id": "default/default-deny"}}
    only(assess(plans, stack, document), "NetworkPolicy:apps-netpol-default-deny: Kubernetes object "
                                         "default/default-deny exists but is not imported")
    assert assess(plans, stack, passing[0]).hazards == []


def test_a_live_rule_that_would_be_dropped(plans, stack, passing, live_account):
    group = live_account.made["k3s"]["group"]
    report = assess(plans, setting(stack, k3sKeepSecurityGroups=[]), passing[0])
    line = only(report, f"k3s host: adopting it detaches live security group {group} (k3s) and with it tcp 22 from "
                        "203.0.113.7/32")
    assert line.endswith(f"add {group} to katforge:k3sKeepSecurityGroups (make discover does), or add 203.0.113.7/32 "
                         "to katforge:adminCidrs")
    # Either fix: the operator's address among adminCidrs, or the live group kept.
    assert assess(plans, setting(stack, adminCidrs=["203.0.113.7/32"]), passing[0]).hazards == []
    assert assess(plans, setting(stack, adminCidrs=[], k3sKeepSecurityGroups=[group]), passing[0]).hazards == []


def test_a_live_egress_rule_that_would_be_dropped(plans, stack, passing, live_account):
    # The office's SSH covered by adminCidrs, so only the live group's egress decides whether it must stay.
    group = live_account.made["k3s"]["group"]
    setting(stack, adminCidrs=["203.0.113.7/32"], k3sKeepSecurityGroups=[])
    document = copy.deepcopy(passing[0])
    egress = document["aws"]["instances"]["k3s"]["securityGroups"][group]["egress"]
    # To another group's members: inside what the program's own egress (all traffic to 0.0.0.0/0) allows.
    egress.append({"protocol": "tcp", "fromPort": 5432, "toPort": 5432,
                   "securityGroupId": live_account.made["vpn"]["group"]})
    assert assess(plans, stack, document).hazards == []
    # IPv6: the program's egress is IPv4 only, so the host would lose it with the group.
    egress.append({"protocol": "-1", "fromPort": None, "toPort": None, "cidrIpv6": "::/0"})
    line = only(assess(plans, stack, document), f"k3s host: adopting it detaches live security group {group} (k3s) "
                                                "and with it egress all traffic to ::/0")
    assert line.endswith(f"add {group} to katforge:k3sKeepSecurityGroups (make discover does)")
    assert adoption.groups_to_keep(plans(stack, document), document)["k3s"] == [group]
    assert assess(plans, setting(stack, k3sKeepSecurityGroups=[group]), document).hazards == []


def test_a_live_wireguard_peer_missing_from_config(plans, stack, passing):
    document = copy.deepcopy(passing[0])  # a peer added on the host by hand since
    key = "Q" * 43 + "="
    document["hosts"]["vpn"]["wireguard"]["peers"].append(
        {"publicKey": key, "allowedIps": "10.99.0.30/32", "name": "carol", "presharedKey": False, "in": ["config"]})
    peers = stackfile.read(stack, SCHEMA)["katforge:wireguardPeers"]
    line = only(assess(plans, stack, document), f"WireGuard peer {key} (10.99.0.30/32) runs live but is not in "
                                                "katforge:wireguardPeers")
    assert f"pulumi config set --path 'katforge:wireguardPeers[{len(peers)}]' 'carol,{key},10.99.0.30/32'" in line
    assert assess(plans, stack, passing[0]).hazards == []  # or added to config, as the line says


def test_a_live_wireguard_peer_at_another_address(plans, stack, passing):
    document = copy.deepcopy(passing[0])
    peer = next(p for p in document["hosts"]["vpn"]["wireguard"]["peers"] if "config" in p["in"])
    peer["allowedIps"] = peer["runningAllowedIps"] = "10.99.0.20/32"
    line = only(assess(plans, stack, document), "live AllowedIPs 10.99.0.20/32, config ")
    assert line.endswith("set its address in katforge:wireguardPeers to 10.99.0.20/32 (make discover does)")
    peers = [line if peer["publicKey"] not in line else line.rsplit(",", 1)[0] + ",10.99.0.20/32"
             for line in stackfile.read(stack, SCHEMA)["katforge:wireguardPeers"]]
    assert assess(plans, setting(stack, wireguardPeers=peers), document).hazards == []
    # Two addresses for one peer: no line of wireguardPeers can keep it.
    peer["allowedIps"] = peer["runningAllowedIps"] = "10.99.0.20/32,10.99.0.21/32"
    only(assess(plans, stack, document), "which wireguard.sh cannot keep (one /32 per peer)")


def test_live_wireguard_hooks_the_new_configuration_does_not_keep(plans, stack, passing):
    # The live wg0.conf (tests/fake_hosts.py) masquerades everything its clients send out of eth0: a full tunnel.
    report = assess(plans, stack, passing[0])
    assert report.hazards == []
    row = report.row("Command:bootstrap-wireguard")
    assert row.op == "risk" and ("does not keep its PostUp `iptables -t nat -A POSTROUTING -s 10.99.0.0/24 -o eth0 "
                                 "-j MASQUERADE`; PostDown `iptables -t nat -D POSTROUTING -s 10.99.0.0/24 -o eth0 "
                                 "-j MASQUERADE`: its own rules let clients reach 172.31.0.0/16 ") in row.detail
    # Rules wireguard.sh writes too, in an operator's words (the interface's name, a host address for its
    # network, -I with a position, -w, `|| true`): kept. One it does not write is named alone.
    document = copy.deepcopy(passing[0])
    wg = document["hosts"]["vpn"]["wireguard"]
    interface = wg["interface"]
    wg["config"]["hooks"] = {
        "PreUp": [], "PostDown": [],
        "PostUp": [f"iptables -w 5 -t nat -I POSTROUTING 1 -s 10.99.0.1/24 -d 172.31.0.0/16 -j MASQUERADE; "
                   f"iptables -A FORWARD -i {interface} -d 172.31.0.0/16 -j ACCEPT"],
        "PreDown": ["iptables -t nat -D POSTROUTING -s 10.99.0.0/24 -d 172.31.0.0/16 -j MASQUERADE || true"]}
    assert assess(plans, stack, document).row("Command:bootstrap-wireguard").op == "create"
    wg["config"]["hooks"]["PostUp"].append("iptables -A FORWARD -i %i -o eth0 -j ACCEPT")
    detail = assess(plans, stack, document).row("Command:bootstrap-wireguard").detail
    assert "does not keep its PostUp `iptables -A FORWARD -i %i -o eth0 -j ACCEPT`: its own" in detail
    # A discovered file from before discovery read the hooks.
    del wg["config"]["hooks"]
    assert assess(plans, stack, document).row("Command:bootstrap-wireguard").detail.startswith(
        "not checked which live PostUp/PostDown rules wireguard.sh keeps")


def test_a_hosted_zone_missing_from_the_account(plans, stack, passing):
    document = copy.deepcopy(passing[0])
    document["aws"]["route53"]["zones"]["stumper.gg"] = {"exists": False}
    records = document["aws"]["route53"]["records"]
    document["aws"]["route53"]["records"] = [r for r in records if r["zone"] != "stumper.gg"]
    zones = [line for line in stackfile.read(stack, SCHEMA)["katforge:zoneIds"] if not line.startswith("stumper.gg=")]
    only(assess(plans, setting(stack, zoneIds=zones), document), "hosted zone stumper.gg: not in the account; the "
                                                                 "program only looks zones up: create it by hand")


def test_a_host_the_bootstrap_cannot_reach_over_ssh(plans, stack, passing):
    # The VPN's live group without its SSH rule: discovery keeps no group for it, and only adminCidrs are left.
    document = copy.deepcopy(passing[0])
    vpn = document["aws"]["instances"]["vpn"]
    for group in vpn["securityGroups"].values():
        group["ingress"] = [r for r in group["ingress"] if r["fromPort"] != 22]
    setting(stack, vpnKeepSecurityGroups=[])
    assert adoption.groups_to_keep(plans(stack, document), document)["vpn"] == []  # what make discover keeps
    only(assess(plans, stack, document), "vpn host: the bootstrap connects to its public address on tcp 22 and "
                                         "nothing would allow it: pulumi config set --path 'katforge:adminCidrs[0]'")
    assert assess(plans, setting(stack, adminCidrs=["198.51.100.7/32"]), document).hazards == []


def test_a_rule_naming_the_vpn_group_does_not_reach_a_public_address():
    # AWS applies a group reference to traffic between private addresses only: the bootstrap, at the k3s
    # host's public address through the VPN, arrives from the VPN host's Elastic IP.
    ssh = dict(protocol="tcp", from_port=22, to_port=22)
    by_group = adoption.Rule(False, peer=adoption.Peer(hosts=frozenset({"vpn"}), group="sg-0vpn"), **ssh)
    by_address = adoption.Rule(False, peer=adoption.Peer(cidr="3.15.140.218/32"), **ssh)
    assert not preflight._admits_ssh(by_group, "k3s", vpn_runs=True, vpn_address="3.15.140.218")
    assert preflight._admits_ssh(by_address, "k3s", vpn_runs=True, vpn_address="3.15.140.218")
    assert not preflight._admits_ssh(by_address, "vpn", vpn_runs=True, vpn_address="3.15.140.218")


def test_mail_from_that_would_reject_mail(plans, stack, passing):
    report = assess(plans, setting(stack, mailFromMxFailure="RejectMessage"), passing[0])
    only(report, "MailFrom:katforge.com: MAIL FROM mail.katforge.com is not verified live (not set up), so "
                 "RejectMessage would refuse every send: pulumi config set katforge:mailFromMxFailure UseDefaultValue")
    # Verified live, RejectMessage is what runs, and discovery keeps it.
    verified = copy.deepcopy(passing[0])
    verified["aws"]["ses"]["identities"]["katforge.com"]["mailFrom"] = {
        "exists": True, "domain": "mail.katforge.com", "status": "Success", "behaviorOnMxFailure": "RejectMessage",
        "import": {"type": "aws:ses/mailFrom:MailFrom", "id": "katforge.com"}}
    assert assess(plans, stack, verified).hazards == []
    assert assess(plans, setting(stack, mailFromMxFailure="UseDefaultValue"), passing[0]).hazards == []


def test_the_traefik_manifest_that_the_handover_cannot_take(plans, stack, passing):
    document = copy.deepcopy(passing[0])
    config = document["cluster"]["objects"]["HelmChartConfig kube-system/traefik"]
    config["deployController"] = {"owned": False, "ownerGvk": None, "owner": "None/None"}  # applied by hand
    imports = stackfile.read(stack, SCHEMA)["katforge:imports"]
    setting(stack, imports=[*imports, "HelmChartConfig:cluster-traefik-config=kube-system/traefik"])  # as discover does
    only(assess(plans, stack, document), "Traefik: the manifest file ")
    # The operator moves the file out of the manifests directory: nothing applies over Pulumi's object.
    document["hosts"]["k3s"]["k3s"]["traefikManifest"]["present"] = False
    report = assess(plans, stack, document)
    assert report.hazards == [] and report.row("HelmChartConfig:cluster-traefik-config").op != "risk"


def test_what_the_baseline_changes_in_sshd_is_a_risk_on_its_step(plans, stack, passing):
    # The live sshd (tests/sshd.py) lets root log in with a key, which host-baseline.sh turns off.
    report = assess(plans, stack, passing[0])
    assert report.hazards == []
    for host in ("k3s", "vpn"):
        row = report.row(f"Command:bootstrap-{host}-baseline")
        assert row.op == "risk" and row.detail.startswith(
            "host-baseline.sh changes sshd: permitrootlogin without-password → no (root cannot log in over SSH")
    document = copy.deepcopy(passing[0])
    document["hosts"]["k3s"]["sshd"]["settings"]["passwordauthentication"] = "yes"
    document["hosts"]["vpn"]["sshd"]["settings"]["permitrootlogin"] = "no"
    report = assess(plans, stack, document)
    assert "passwordauthentication yes → no (logins with a password end)" in report.row(
        "Command:bootstrap-k3s-baseline").detail
    assert report.row("Command:bootstrap-vpn-baseline").op == "create"  # nothing changes there
    document["hosts"]["vpn"]["sshd"] = {"error": "/usr/sbin/sshd: no hostkeys available -- exiting."}
    assert report.hazards == [] and assess(plans, stack, document).row(
        "Command:bootstrap-vpn-baseline").detail.startswith("not checked what host-baseline.sh changes in sshd")


def test_md5_roles_that_pg_configure_refuses(plans, stack, passing):
    document = copy.deepcopy(passing[0])
    document["hosts"]["k3s"]["postgres"]["roles"]["katforge"] = {"login": True, "password": "md5", "superuser": False,
                                                                 "quoted": "katforge"}
    line = only(assess(plans, stack, document), "PostgreSQL: pg-configure.sh refuses, so pulumi up stops there (after "
                                                "the AWS changes): refusing to replace pg_hba.conf; nothing was changed. "
                                                "These login roles have md5 password hashes")
    assert "sudo -u postgres psql -c \"SET password_encryption = 'scram-sha-256'\" -c '\\password katforge'" in line
    document["hosts"]["k3s"]["postgres"]["roles"]["katforge"]["password"] = "scram-sha-256"
    assert assess(plans, stack, document).hazards == []


def test_live_pg_hba_rules_the_new_file_would_not_honour(plans, stack, passing):
    # The session's server admits local users by trust (initdb's default), which the program's pg_hba does not
    # keep: pg-configure.sh's own check refuses, naming the lines, until the runbook lets them go.
    line = only(assess(plans, setting(stack, postgresDropLiveHbaRules=False), passing[0]),
                "refusing to replace pg_hba.conf; nothing was changed. These live rules admit connections")
    assert ": local all all trust " in line and "katforge:postgresExtraClientCidrs" in line
    # As Ubuntu's peer lines, plus a network of the operators' that the client networks do not hold.
    document = copy.deepcopy(passing[0])
    pg = document["hosts"]["k3s"]["postgres"]
    text = dict(map(tuple, pg["hbaText"][pg["settings"]["hba_file"]]))
    for rule in pg["hba"]:
        if rule["method"] == "trust":
            rule["method"] = "peer"
            text[rule["line"]] = text[rule["line"]].replace("trust", "peer")
    last = max(rule["rule"] for rule in pg["hba"] if rule["rule"])
    pg["hba"].append({"line": 200, "type": "host", "databases": ["all"], "users": ["all"], "address": "192.168.0.0",
                      "netmask": "255.255.0.0", "method": "md5", "options": [], "error": None,
                      "file": pg["settings"]["hba_file"], "rule": last + 1})
    text[200] = "host    all     all     192.168.0.0/16      md5"
    pg["hbaText"][pg["settings"]["hba_file"]] = sorted(map(list, text.items()))
    only(assess(plans, stack, document), "pg_hba.conf line 200: host all all 192.168.0.0/16 md5 Keep a network")
    assert assess(plans, setting(stack, postgresExtraClientCidrs=["192.168.0.0/16"]), document).hazards == []


@pytest.mark.parametrize("where, later", [("auto", True), ("zz-tuning.conf", True), ("00-early.conf", False)])
def test_a_postgresql_setting_a_later_file_overrides(plans, stack, passing, where, later):
    document = copy.deepcopy(passing[0])
    pg = document["hosts"]["k3s"]["postgres"]
    conf_d = str(Path(pg["settings"]["config_file"]).parent / "conf.d")
    path = f"{pg['settings']['data_directory']}/postgresql.auto.conf" if where == "auto" else f"{conf_d}/{where}"
    pg["fileSettings"].append({"seqno": 999, "name": "work_mem", "file": path, "line": 3, "applied": True})
    report = assess(plans, stack, document)
    if later:
        line = only(report, f"settings of {conf_d}/katforge.conf are overridden by files read after it: work_mem "
                            f"from {path} line 3")
        assert "ALTER SYSTEM RESET <name>" in line
    else:
        assert report.hazards == []


def test_what_postgres_owns_outside_schema_public_is_a_risk(plans, stack, passing):
    document = copy.deepcopy(passing[0])
    document["hosts"]["k3s"]["postgres"]["foreignOwned"]["katforge"] = [["schema", "reporting"],
                                                                        ["table", "reporting.daily"]]
    report = assess(plans, stack, document)
    assert report.hazards == []
    row = next(row for row in report.rows if "postgres owns" in row.detail)
    assert row.op == "risk" and row.detail.startswith(
        "postgres owns schema reporting, table reporting.daily in database katforge, outside schema public: the apps, "
        "as role katforge from this up on, cannot alter them")


def test_postgresql_settings_that_need_a_restart_not_allowed(plans, stack, passing):
    report = assess(plans, setting(stack, postgresAllowRestart=False), passing[0])
    only(report, "max_connections (100 → 60)")
    assert assess(plans, setting(stack, postgresAllowRestart=True), passing[0]).hazards == []


def test_secrets_encryption_on_in_config_and_off_live(plans, stack, passing):
    line = only(assess(plans, setting(stack, k3sSecretsEncryption=True), passing[0]),
                "k3s host: k3s-install.sh refuses, so pulumi up stops there (after the AWS changes): k3s v1.34.6+k3s1 "
                "runs without secrets encryption")
    assert "pulumi config set katforge:k3sEncryptExistingSecrets true" in line
    # Either opt in to encrypting them, or keep what runs (discovery sets it).
    assert assess(plans, setting(stack, k3sEncryptExistingSecrets=True), passing[0]).hazards == []
    assert assess(plans, setting(stack, k3sEncryptExistingSecrets=False, k3sSecretsEncryption=False),
                  passing[0]).hazards == []


def test_live_k3s_settings_that_config_yaml_sets_otherwise(plans, stack, passing):
    # The live unit's command line and its env file give --write-kubeconfig-mode 644 (tests/fake_hosts.py),
    # the program's config.yaml 0600: k3s-install.sh's own check refuses it, as on the host.
    line = only(assess(plans, setting(stack, k3sReplaceLiveFlags=False), passing[0]), "k3s host: k3s-install.sh refuses")
    assert "write-kubeconfig-mode: 644 on the live host, 0600 in config.yaml (from the live unit's command line)" in line
    assert "pulumi config set katforge:k3sReplaceLiveFlags true" in line
    assert not any(value in line for value in ("[redacted]", "katforge-preflight-"))
    # Without the flag the env file's K3S_KUBECONFIG_MODE is the live value, refused alike.
    document = copy.deepcopy(passing[0])
    unit = document["hosts"]["k3s"]["k3s"]["unitFiles"][0]
    for setting_ in unit["settings"]:
        if setting_[0] == "ExecStart":
            setting_[1] = [word for word in setting_[1] if word not in ("--write-kubeconfig-mode", "644")]
    env_file = next(iter(document["hosts"]["k3s"]["k3s"]["env"]))
    only(assess(plans, stack, document), f"write-kubeconfig-mode: 644 on the live host, 0600 in config.yaml (from "
                                         f"K3S_KUBECONFIG_MODE in {env_file})")
    assert assess(plans, setting(stack, k3sReplaceLiveFlags=True), passing[0]).hazards == []


def test_a_live_k3s_flag_in_a_drop_in_is_refused_even_with_the_opt_in(plans, stack, passing):
    document = copy.deepcopy(passing[0])
    drop_in = "/etc/systemd/system/k3s.service.d/override.conf"
    document["hosts"]["k3s"]["k3s"]["unitFiles"].append({"path": drop_in, "settings": [
        ["ExecStart", []], ["ExecStart", ["/usr/local/bin/k3s", "server", "--node-ip", "10.0.0.5"]]]})
    line = only(assess(plans, stack, document), "node-ip: 10.0.0.5 on the live host, 172.31.14.98 in config.yaml (from "
                                                f"the ExecStart of {drop_in})")
    assert "cannot be replaced" in line


@pytest.mark.parametrize("live, message", [
    ("v1.34.7+k3s1", "refusing to downgrade k3s from v1.34.7+k3s1 to v1.34.6+k3s1"),
    ("v1.32.9+k3s1", "refusing to go from v1.32.9+k3s1 to v1.34.6+k3s1: Kubernetes upgrades one minor version at a time"),
], ids=["downgrade", "two-minors"])
def test_a_k3s_release_the_script_will_not_go_to(plans, stack, passing, live, message):
    document = copy.deepcopy(passing[0])
    document["hosts"]["k3s"]["k3s"]["version"] = live
    only(assess(plans, stack, document), message)


def test_a_wireguard_port_other_than_the_live_one(plans, stack, passing):
    only(assess(plans, setting(stack, wireguardPort=51821), passing[0]),
         "WireGuard: the live server listens on 51820, the program would move it to 51821: pulumi config set "
         "katforge:wireguardPort 51820")
    assert assess(plans, setting(stack, wireguardPort=51820), passing[0]).hazards == []


def test_a_wireguard_address_other_than_the_live_one(plans, stack, passing):
    document = copy.deepcopy(passing[0])
    wg = document["hosts"]["vpn"]["wireguard"]
    for facts in (wg["config"], wg["running"] or {}):
        facts["address"] = "10.8.0.1/24"
    only(assess(plans, stack, document), "WireGuard: the live server is 10.8.0.1/24, the program would make it "
                                         "10.99.0.1/24 and move every client: pulumi config set "
                                         "katforge:vpnClientCidr 10.8.0.0/24")
    assert assess(plans, stack, passing[0]).hazards == []


def test_an_iam_user_without_room_for_the_new_key(plans, stack, passing):
    document = copy.deepcopy(passing[0])
    document["aws"]["iam"]["users"]["ses-sender"]["accessKeys"] = 2
    only(assess(plans, stack, document), "IAM user ses-sender has 2 access keys, the most AWS allows")
    document["aws"]["iam"]["users"]["ses-sender"]["accessKeys"] = 1
    assert assess(plans, stack, document).hazards == []


def test_a_source_discovery_did_not_read(plans, stack, passing):
    document = copy.deepcopy(passing[0])
    document["sources"]["hosts"] = {"status": "skipped", "why": "--no-hosts"}
    document["hosts"] = None
    only(assess(plans, stack, document), "hosts: not checked (--no-hosts): run make discover with it")
    report = assess(plans, stack, document, waived=["hosts"])
    assert report.hazards == [] and report.notes == ["hosts not checked (--no-hosts): waived with --accept-unchecked "
                                                     "hosts"]


def test_a_fact_discovery_could_not_read(plans, stack, passing):
    document = copy.deepcopy(passing[0])
    document["aws"]["iam"]["users"]["ses-sender"] = {"error": "AccessDenied: not allowed iam:GetUser"}
    only(assess(plans, stack, document), "User:ses-sender: not checked: discovery could not read "
                                         "aws.iam.users.ses-sender (AccessDenied")
    assert assess(plans, stack, passing[0]).hazards == []


# --- the command ------------------------------------------------------------------------------------

def test_a_missing_or_foreign_discovered_file_exits_2_with_one_line(tmp_path, adoption, capsys):
    assert preflight.main(["--stack", "prod", "--discovered", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run make discover STACK=prod first" in err
    other = tmp_path / "qa.json"
    other.write_bytes(adoption.runs[0].json.replace(b'"stack": "prod"', b'"stack": "qa"'))
    assert preflight.main(["--stack", "prod", "--discovered", str(other)]) == 2
    assert "discovered for stack qa, not prod" in capsys.readouterr().err


def test_rows_read_as_their_operation_then_the_import_line_name():
    assert str(preflight.Row("import then update", "Instance:k3s", "tags.Name katforge-k3s → k3s")) == \
        "import then update  Instance:k3s: tags.Name katforge-k3s → k3s"


def test_help_reads_like_a_readme_paragraph():
    result = subprocess.run([sys.executable, "-m", "tools.preflight", "--help"], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    text = " ".join(result.stdout.split())
    assert "build/discovered-<stack>.json" in text and "one row per resource" in text
    assert "Exits 0 when the first `up` is safe" in text and "--accept-unchecked" in text


def test_make_preflight_passes_the_stack(tmp_path):
    result = subprocess.run(["make", "-n", "preflight", "STACK=qa"], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    assert "-m tools.preflight --stack qa" in result.stdout

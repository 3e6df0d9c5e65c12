"""Bad configuration stops the program before any resource, with one line naming file, key, value and form."""
import base64
import json
import re
import shutil
import subprocess

import pulumi
import pytest
import yaml

from infra.settings import SettingsError, _refuse_unknown_keys
from tools import plan
from tools.offline import ROOT, evaluate

PEER_KEY = "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY="
OTHER_KEY = "MTIzNDU2Nzg5MGFiY2RlZmdoaWprbG1ub3BxcnN0dXY="


def error_of(stack: str = "prod", **config) -> str:
    with pytest.raises(SettingsError) as caught:
        evaluate(stack, {(k if ":" in k else f"katforge:{k}"): v for k, v in config.items()})
    message = str(caught.value)
    assert "\n" not in message
    return message


def ssh_line(label: str, blob_type: str, size: int = 32) -> str:
    """An OpenSSH public key line whose key data (SSH wire format) names `blob_type` and holds `size` bytes."""
    def string(data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + data
    return f"{label} {base64.b64encode(string(blob_type.encode()) + string(b'k' * size)).decode()} ops@katforge.com"


@pytest.mark.parametrize("key, value, expected", [
    ("vpcCidr", "172.31.0.0/33", "CIDR"),
    ("vpcCidr", "172.31.0.1/16", "no host bits"),
    ("vpnClientCidr", "10.99.0.0", "CIDR"),
    ("adminCidrs", ["203.0.113.7/32", "not-a-cidr"], "CIDR"),
    ("k3sPrivateIp", "10.1.2.3", "inside the VPC 172.31.0.0/16"),
    ("k3sPrivateIp", "172.31.14.300", "IPv4 address"),
    ("k3sInstanceType", "t3.mediun", "instance type"),
    ("vpnInstanceType", "t2nano", "instance type"),
    ("sesFromAddresses", ["noreply@katforge..com"], "email address at katforge.com"),
    ("sesFromAddresses", ["noreply@example.com"], "email address at katforge.com"),
    ("acmeEmail", "ops@katforge", "email address"),
    ("mailFromSubdomain", "mail.bounce", "single DNS label"),
    ("dmarcPolicy", "block", "none, quarantine, reject"),
    ("k3sVersion", "v1.33.4+k3s1", "K3S_TRAEFIK_CHART"),
    ("k3sVersion", "v1.34.99+k3s1", "v1.34.6+k3s1"),
    # A live host's root volume, as discovery finds it.
    ("k3sRootVolumeGb", 4, "a whole number from 8 to 16384"),
    ("vpnRootVolumeGb", 20000, "a whole number from 8 to 16384"),
    ("k3sRootVolumeType", "st1", "an EBS type an instance boots from: gp2, gp3, io1, io2, standard"),
    ("vpnRootVolumeType", "GP3", "an EBS type an instance boots from"),
    ("k3sRootVolumeEncrypted", "no", "true or false"),
    ("vpnRootVolumeEncrypted", "yes", "true or false"),
    ("vpnSubnetId", "172.31.16.0/20", "empty (the k3s host's subnet), or a subnet ID such as subnet-0123456789abcdef0"),
    ("k3sKeepSecurityGroups", ["sg-0123456789abcdef1", "launch-wizard-1"], "a security group ID such as sg-"),
    ("vpnKeepSecurityGroups", ["sg-0123456789abcdef2", "sg-0123456789abcdef2"], "each once, but it is listed twice"),
    ("zoneIds", ["katforge.com"], "but '' is not a hosted zone ID"),
    ("zoneIds", ["katforge.com=/hostedzone/Z0292557263L1FJT7JXXS"], "is not a hosted zone ID (capitals and digits, "
                                                                    "without /hostedzone/)"),
    ("zoneIds", ["katforge.com=z0292557263l1fjt7jxxs"], "is not a hosted zone ID"),
    ("zoneIds", ["example.com=Z0292557263L1FJT7JXXS"], "but 'example.com' is not a zone of infra/dns.py"),
    ("zoneIds", ["katforge.com=Z1", "katforge.com=Z2"], "but katforge.com has an ID already (Z1)"),
    ("mailFromMxFailure", "Reject",
     "UseDefaultValue (SES's own MAIL FROM domain until yours verifies) or RejectMessage"),
    # Import lines: their form, the IDs whose form is known, each resource and each live object once.
    ("imports", ["Instance:k3s i-0abc12345def67890"], '"<Type>:<name>=<id>" lines such as "Instance:k3s=i-'),
    ("imports", ["instance:k3s=i-0abc12345def67890"], '"<Type>:<name>=<id>" lines'),
    ("imports", ["Instance:k3s="], '"<Type>:<name>=<id>" lines'),
    ("imports", ["Instance:k3s=k3s"], "but 'k3s' is not an instance ID such as i-0123456789abcdef0"),
    ("imports", ["Eip:k3s=3.19.192.157"], "but '3.19.192.157' is not an allocation ID such as eipalloc-"),
    ("imports", ["EipAssociation:k3s=eipalloc-0123456789abcdef0"], "is not an association ID such as eipassoc-"),
    ("imports", ["Policy:backups-restore=katforge-backup-restore"], "is not a policy ARN such as arn:aws:iam::"),
    ("imports", ["OpenIdConnectProvider:github-actions=token.actions.githubusercontent.com"], "is not a provider ARN"),
    ("imports", ["User:ses-sender=ses-sender", "User:ses-sender=ses-sender2"],
     "each resource once, but User:ses-sender is listed already (User:ses-sender=ses-sender)"),
    ("imports", ["User:ses-sender=ses-sender", "User:dns-challenge=ses-sender"],
     "each live object once, but User:ses-sender imports ses-sender already"),
    ("sshPublicKey", "AAAAC3Nza", "OpenSSH public key"),
    ("githubRepository", "katforge", "owner/name"),
    # Pulumi reads an unquoted 3:30 as the text "3:30" (tests/test_stackfile.py); hours have two digits.
    ("backupTime", "3:30", 'HH:MM with two-digit hours, quoted, e.g. "03:30"'),
    # Public ranges wider than /16 would open SSH and the k3s API to much of the internet.
    ("adminCidrs", ["0.0.0.0/0"], "public range of /16 or narrower (0.0.0.0/0 would admit 4294967296 addresses"),
    ("adminCidrs", ["203.0.113.7/32", "203.0.0.0/8"], "/16 or narrower"),
    ("k3sApiCidrs", ["128.0.0.0/1"], "/16 or narrower"),
    # The client range must not be mistaken for the VPC, the pods or the services.
    ("vpnClientCidr", "172.31.200.0/24", "apart from the VPC 172.31.0.0/16"),
    ("vpnClientCidr", "10.0.0.0/8", "apart from k3s's pod network 10.42.0.0/16"),
    ("vpnClientCidr", "10.42.7.0/24", "apart from k3s's pod network 10.42.0.0/16"),
    ("vpnClientCidr", "10.43.0.0/24", "apart from k3s's service network 10.43.0.0/16"),
    ("vpnClientCidr", "10.99.0.0/31", "/30 or wider"),
    # The five addresses AWS keeps in the host's subnet 172.31.0.0/20.
    ("k3sPrivateIp", "172.31.0.0", "in subnet 172.31.0.0/20, but it reserves 172.31.0.0 for its network address"),
    ("k3sPrivateIp", "172.31.0.1", "reserves 172.31.0.1 for the VPC router"),
    ("k3sPrivateIp", "172.31.0.2", "reserves 172.31.0.2 for DNS"),
    ("k3sPrivateIp", "172.31.0.3", "reserves 172.31.0.3 for future use"),
    ("k3sPrivateIp", "172.31.15.255", "reserves 172.31.15.255 for its broadcast address"),
    # The key data must be the key the line names.
    ("sshPublicKey", ssh_line("ssh-ed25519", "ssh-rsa"), "but the key data is a 'ssh-rsa' key, not ssh-ed25519"),
    ("sshPublicKey", ssh_line("ssh-ed25519", "ssh-ed25519")[:40] + " ops", "but the base64 key after ssh-ed25519 is not whole"),
    ("sshPublicKey", ssh_line("ssh-ed25519", "ssh-ed25519", size=31), "does not have the fields of a ssh-ed25519 key"),
    ("sshPublicKey", ssh_line("ssh-rsa", "ssh-rsa"), "does not have the fields of a ssh-rsa key"),
    ("sshPublicKey", ssh_line("ecdsa-sha2-nistp256", "ecdsa-sha2-nistp256"), "EC2 imports only ssh-ed25519 and ssh-rsa keys"),
    # A peer line: which of its three parts is wrong, with the expected form.
    ("wireguardPeers", [f"laptop,{PEER_KEY}"], "2 comma-separated parts, not 3"),
    ("wireguardPeers", [f"Alice Laptop,{PEER_KEY},10.99.0.2/32"], "the name 'Alice Laptop' is not a lowercase label"),
    ("wireguardPeers", ["laptop,notakey,10.99.0.2/32"], "the public key 'notakey' is not a WireGuard key"),
    ("wireguardPeers", [f"laptop,{PEER_KEY},10.8.0.2/32"], "the address '10.8.0.2/32' is not a /32 inside 10.99.0.0/24"),
    ("wireguardPeers", [f"laptop,{PEER_KEY},10.99.0.2/24"], "is not a /32 inside"),
    ("wireguardPeers", [f"laptop,{PEER_KEY},10.99.0.1/32"], "the address 10.99.0.1/32 is the VPN server's own"),
    ("wireguardPeers", [f"laptop,{PEER_KEY},10.99.0.255/32"], "network or broadcast address of 10.99.0.0/24"),
    # What a host script may do to a live host is a yes or a no, nothing in between.
    ("postgresAllowRestart", "yes", "true or false"),
    ("wireguardPort", "0", "whole number from 1 to 65535"),
])
def test_bad_value_names_file_key_value_and_form(key, value, expected):
    message = error_of(**{key: value})
    shown = value[-1] if isinstance(value, list) else value
    assert message.startswith(f"Pulumi.prod.yaml: katforge:{key} = {shown}: expected ")
    assert expected in message


def test_peer_error_shows_the_expected_form():
    message = error_of(wireguardPeers=["laptop,notakey,10.99.0.2/32"])
    assert 'expected "name,publickey,address/32", e.g. "alice-laptop,<wg pubkey output>,10.99.0.2/32"' in message


@pytest.mark.parametrize("second, part", [
    (f"b,{PEER_KEY},10.99.0.3/32", "peer 'a' already has this public key"),
    (f"b,{OTHER_KEY},10.99.0.2/32", "peer 'a' already has this address"),
    (f"a,{OTHER_KEY},10.99.0.3/32", "peer 'a' already has this name"),
])
def test_a_peer_repeating_another_peers_part_is_refused(second, part):
    message = error_of(wireguardPeers=[f"a,{PEER_KEY},10.99.0.2/32", second])
    assert message.startswith(f"Pulumi.prod.yaml: katforge:wireguardPeers = {second}: expected ")
    assert part in message


def test_a_wide_private_range_opens_nothing_to_the_internet_and_is_accepted():
    assert evaluate("prod", {"katforge:adminCidrs": ["10.0.0.0/8"]}).stack == "prod"


def test_distinct_peers_are_accepted():
    peers = [f"a,{PEER_KEY},10.99.0.2/32", f"b,{OTHER_KEY},10.99.0.254/32"]
    assert evaluate("qa", {"katforge:wireguardPeers": peers}).stack == "qa"


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen (OpenSSH) is not installed")
@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_real_keys_from_ssh_keygen_are_accepted(kind, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "ops@katforge.com", "-f", tmp_path / "key"],
                   check=True)
    line = (tmp_path / "key.pub").read_text().strip()
    planned = evaluate("prod", {"katforge:sshPublicKey": line})
    assert planned.named("operators").raw_inputs["publicKey"] == line


TAGS = ["api=v2.3.1", "web=v1.8.0", "lextris=v0.4.2", "stumper=v1.1.0"]


@pytest.mark.parametrize("tags, bad, expected", [
    (["api=latest", *TAGS[1:]], "api=latest", "but latest is a moving tag: name a release of api"),
    (["wbe=v1.8.0", *TAGS], "wbe=v1.8.0", "but 'wbe' is not an app of infra/apps.py; did you mean web?"),
    ([*TAGS, "web=v1.9.0"], "web=v1.9.0", "but web has a tag already (v1.8.0)"),
    ([*TAGS, "web=:v1"], "web=:v1", "but ':v1' is not an image tag"),
])
def test_an_image_tag_must_name_a_release_of_a_known_app(tags, bad, expected):
    message = error_of(imageTags=tags)
    assert message == (f"Pulumi.prod.yaml: katforge:imageTags = {bad}: expected \"app=tag\" lines, one per app prod "
                       f'runs (api, web, lextris, stumper), e.g. "api=v1.4.2", {expected}')


def test_every_app_the_stage_runs_needs_a_tag_and_only_those():
    message = error_of(imageTags=TAGS[:3])
    assert message.startswith(f'Pulumi.prod.yaml: katforge:imageTags = {json.dumps(TAGS[:3])}: expected ')
    assert "but stumper has no tag; set it with: pulumi config set --path 'katforge:imageTags[3]' stumper=<tag>" in message
    planned = evaluate("qa", {"katforge:imageTags": ["web=v1.8.0", "api=v2.3.1"]})
    images = {r.name: r.raw_inputs["spec"]["template"]["spec"]["containers"][0]["image"]
              for r in planned.of_type("kubernetes:apps/v1:Deployment")}
    assert images == {"apps-api": "ghcr.io/katforge/api.katforge.com:v2.3.1",
                      "apps-web": "ghcr.io/katforge/katforge.com:v1.8.0"}


def test_image_tags_have_no_default():
    assert error_of(imageTags=None).startswith("Pulumi.prod.yaml: katforge:imageTags = (not set): expected ")


@pytest.mark.parametrize("stack, key", [("prod", "dbPassword"), ("prod", "sshPrivateKey"), ("prod", "ghcrToken"),
                                        ("qa", "dbPassword")])
def test_missing_secret_says_the_exact_command(stack, key):
    message = error_of(stack, **{key: None})
    assert message == (f"Pulumi.{stack}.yaml: katforge:{key} = (not set): expected a secret; "
                       f"set it with: pulumi config set --secret katforge:{key} --stack {stack}")  # prompts: no value in history


@pytest.mark.parametrize("unset", [None, ""])
def test_missing_plain_key_says_the_command_without_secret(unset):
    message = error_of(sshPublicKey=unset)
    assert message.startswith("Pulumi.prod.yaml: katforge:sshPublicKey = (not set): expected an OpenSSH public key")
    assert message.endswith("; set it with: pulumi config set katforge:sshPublicKey <value> --stack prod")


def test_every_recorded_k3s_release_is_a_v1_34_patch():
    from infra.settings import K3S_TRAEFIK_CHART
    assert K3S_TRAEFIK_CHART and all(re.fullmatch(r"v1\.34\.\d+\+k3s\d+", v) for v in K3S_TRAEFIK_CHART)


def test_qa_needs_no_ssh_public_key():
    assert evaluate("qa", {"katforge:sshPublicKey": ""}).stack == "qa"


def test_unknown_stage_is_refused():
    assert error_of("dev").startswith("Pulumi.dev.yaml: unknown stage 'dev': expected a stack named after a stage")


def test_region_must_be_us_east_2():
    assert error_of(**{"aws:region": "eu-west-1"}) == (
        "Pulumi.prod.yaml: aws:region = eu-west-1: expected us-east-2, where the estate and SES live; "
        "set it with: pulumi config set aws:region us-east-2 --stack prod")


@pytest.mark.parametrize("typo, meant", [("backuptime", "backupTime"), ("adminCidr", "adminCidrs"),
                                         ("k3sInstanceTyp", "k3sInstanceType"), ("ADMINCIDRS", "adminCidrs")])
def test_an_undeclared_key_is_refused_naming_the_closest_one(typo, meant):
    message = error_of(**{typo: "04:00"})
    assert message == (f"Pulumi.prod.yaml: katforge:{typo} = 04:00: expected a key that Pulumi.yaml declares; "
                       f"did you mean katforge:{meant}?")


def test_an_undeclared_key_far_from_any_is_refused_too():
    assert "expected a key that Pulumi.yaml declares (see its config: section)" in error_of(colour="blue")


def test_a_stack_may_set_a_declared_key_it_does_not_use():
    """Declared means known: qa may carry a prod-only key without being refused."""
    assert evaluate("qa", {"katforge:k3sInstanceType": "t3.large"}).stack == "qa"


def test_an_undeclared_secret_key_does_not_show_its_value():
    evaluate("qa")  # the runtime as a run leaves it: stack qa
    pulumi.runtime.set_all_config({"katforge:dbPasword": "hunter2"}, ["katforge:dbPasword"])
    with pytest.raises(SettingsError) as caught:
        _refuse_unknown_keys()
    assert str(caught.value).startswith("Pulumi.qa.yaml: katforge:dbPasword = [secret]: expected a key")
    assert "hunter2" not in str(caught.value)


def test_make_plan_stops_with_one_line_and_exit_2(monkeypatch, capfd):
    """What `make plan` prints for a bad setting: the one line, no traceback."""
    monkeypatch.setattr("tools.offline.stack_config", 
                        lambda stack, encrypted=None: {"aws:region": "us-east-2", "katforge:adminCidrs": ["0.0.0.0/0"]})
    assert plan.main(["--stack", "prod"]) == 2
    out, err = capfd.readouterr()
    assert err.startswith("Pulumi.prod.yaml: katforge:adminCidrs = 0.0.0.0/0: expected ")
    assert err.count("\n") == 1 and out == ""


def test_every_key_read_is_declared_with_type_and_description(monkeypatch):
    """Pulumi.yaml is the one description of the config: nothing is read that it does not declare, and
    it declares nothing that is never read."""
    read = set()
    for method in ("get", "get_secret"):
        original = getattr(pulumi.Config, method)

        def recording(self, key, *args, _original=original, **kwargs):
            read.add(f"{self.name}:{key}")
            return _original(self, key, *args, **kwargs)

        monkeypatch.setattr(pulumi.Config, method, recording)
    evaluate("qa")
    declared = yaml.safe_load((ROOT / "Pulumi.yaml").read_text())["config"]
    assert {k for k in read if k.startswith("katforge:")} == {f"katforge:{k}" for k in declared}
    for key, declaration in declared.items():
        assert declaration.get("type") in ("string", "integer", "boolean", "array"), key
        assert declaration.get("description"), key

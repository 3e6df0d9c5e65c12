"""Bad configuration stops the program before any resource, with one message naming key, value and form."""
import re

import pulumi
import pytest
import yaml

from infra.settings import SettingsError
from tools.offline import ROOT, evaluate


def error_of(stack: str = "prod", **config) -> str:
    with pytest.raises(SettingsError) as caught:
        evaluate(stack, {(k if ":" in k else f"katforge:{k}"): v for k, v in config.items()})
    return str(caught.value)


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
    ("k3sEipAllocationId", "3.19.192.157", "allocation ID"),
    ("k3sInstanceId", "k3s", "instance ID"),
    ("k3sVersion", "v1.33.4+k3s1", "K3S_TRAEFIK_CHART"),
    ("k3sVersion", "v1.34.99+k3s1", "v1.34.6+k3s1"),
    ("rootVolumeGb", 4, "whole number from 8"),
    ("sshPublicKey", "AAAAC3Nza", "OpenSSH public key"),
    ("wireguardPeers", ["laptop,notakey,10.99.0.2/32"], "WireGuard public key"),
    ("wireguardPeers", ["laptop,YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY=,10.8.0.2/32"], "inside 10.99.0.0/24"),
    ("backupTime", "3:30", "HH:MM"),
    ("githubRepository", "katforge", "owner/name"),
])
def test_bad_value_names_key_value_and_form(key, value, expected):
    message = error_of(**{key: value})
    assert f"katforge:{key}" in message
    shown = value[-1] if isinstance(value, list) else value
    assert repr(shown) in message
    assert expected in message


@pytest.mark.parametrize("stack, key", [("prod", "dbPassword"), ("prod", "sshPrivateKey"), ("prod", "ghcrToken"),
                                        ("qa", "dbPassword")])
def test_missing_secret_says_the_exact_command(stack, key):
    message = error_of(stack, **{key: None})
    assert message.endswith(f"pulumi config set --secret katforge:{key} --stack {stack}")  # prompts: no value in history


@pytest.mark.parametrize("unset", [None, ""])
def test_missing_plain_key_says_the_command_without_secret(unset):
    message = error_of(sshPublicKey=unset)
    assert "pulumi config set katforge:sshPublicKey <value> --stack prod" in message


def test_every_recorded_k3s_release_is_a_v1_34_patch():
    from infra.settings import K3S_TRAEFIK_CHART
    assert K3S_TRAEFIK_CHART and all(re.fullmatch(r"v1\.34\.\d+\+k3s\d+", v) for v in K3S_TRAEFIK_CHART)


@pytest.mark.parametrize("role", ["k3s", "vpn"])
@pytest.mark.parametrize("given", ["InstanceId", "EipAllocationId"])
def test_a_host_is_adopted_with_its_elastic_ip_or_not_at_all(role, given):
    value = "i-0abc12345def67890" if given == "InstanceId" else "eipalloc-0123456789abcdef0"
    message = error_of(**{f"{role}{given}": value})
    missing = "EipAllocationId" if given == "InstanceId" else "InstanceId"
    assert f"katforge:{role}{missing} is not set" in message and "or neither" in message


def test_qa_needs_no_ssh_public_key():
    assert evaluate("qa", {"katforge:sshPublicKey": ""}).stack == "qa"


def test_unknown_stage_is_refused():
    assert "unknown stage 'dev'" in error_of("dev")


def test_region_must_be_us_east_2():
    message = error_of(**{"aws:region": "eu-west-1"})
    assert "aws:region" in message and "us-east-2" in message


def test_duplicate_wireguard_address_is_refused():
    key = "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY="
    message = error_of(wireguardPeers=[f"a,{key},10.99.0.2/32", f"b,{key},10.99.0.2/32"])
    assert "each peer address to appear once" in message


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

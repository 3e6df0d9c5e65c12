"""A simulated AWS account as the live estate has it, in moto's server on 127.0.0.1, for the discovery
and preflight tests. Its session fixtures `live_account` and `empty_account` come with
`pytest_plugins = ["tests.live_account"]` in a test module (imported instead, each module would start
a server of its own).

The live account is built as ../shared/spec/deployment.md describes the estate, with what a hand-built
estate really looks like rather than what the program would make:

- both root volumes unencrypted; the VPN host in another subnet (another AZ) than the k3s host, with a
  20 GB gp2 root volume where the program declares 8 GB; IMDSv1 allowed with two hops; no termination
  protection; the VPN host's source/dest check still on;
- the spec's addresses: 172.31.14.98 and the Elastic IPs 3.19.192.157 and 3.15.140.218;
- security groups made by hand, one with an extra live rule (SSH from an admin /32) and the VPN's
  SSH open to the world;
- IAM users traefik-dns-challenge (AmazonRoute53FullAccess, as the spec says) and ses-sender, key pair
  katforge-operators (the stack's key, with the comment EC2 gives it), the GitHub OIDC provider and configuration set katforge, under the program's names;
- the two hosted zones (created by hand: moto gives them random IDs), the spec's records with TTL 3600;
- SES identity katforge.com with Easy DKIM and its records, but no MAIL FROM domain.

The empty account has the two hosted zones and nothing else. Both are accounts of one moto server that
runs in a process of its own (moto's state is process-wide, and other tests reset theirs in theirs);
the empty one is reached with credentials of a role assumed in it, as an operator's often are.
"""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

from tools.offline import OPERATOR_PLACEHOLDERS

REGION = "us-east-2"
K3S_PRIVATE_IP = "172.31.14.98"
K3S_PUBLIC_IP = "3.19.192.157"
VPN_PUBLIC_IP = "3.15.140.218"
VPN_SUBNET = "172.31.16.0/20"  # the k3s host's is 172.31.0.0/20, another AZ
ADMIN_CIDR = "203.0.113.7/32"  # the extra live rule: SSH to the k3s host from an operator's address
LIVE_TTL = 3600
DKIM_TTL = 1800
ZONES = ("katforge.com", "stumper.gg")
ROUTE53_FULL_ACCESS = "arn:aws:iam::aws:policy/AmazonRoute53FullAccess"
GITHUB_THUMBPRINT = "6938fd4d98bab03faadb97b34396831e3780aea1"

# The image the live hosts were launched from (Canonical's Ubuntu 24.04), the only one the account
# knows: moto's own catalogue of images takes seconds to load.
UBUNTU_AMI = {"ami_id": "ami-0a1b2c3d4e5f67890", "state": "available", "public": True, "owner_id": "099720109477",
              "image_location": "amazon/ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20250115",
              "root_device_type": "ebs", "root_device_name": "/dev/sda1", "image_type": "machine",
              "architecture": "x86_64", "virtualization_type": "hvm", "hypervisor": "xen",
              "name": "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20250115",
              "description": "Canonical, Ubuntu, 24.04, amd64 noble image"}

# A ThreadedMotoServer in a process of its own: prints its port, serves until stopped.
_SERVE = """
import logging, threading
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
threading.Event().wait()
"""
DEFAULT_ACCOUNT = "123456789012"  # moto's, and the offline plan's (tools/offline.py ACCOUNT_ID)
EMPTY_ACCOUNT = "111111111111"


class MotoServer:
    """moto's server on 127.0.0.1 at a free port, in a child process."""

    def __init__(self) -> None:
        self.scratch = Path(tempfile.mkdtemp(prefix="katforge-moto-"))
        amis = self.scratch / "amis.json"
        amis.write_text(json.dumps([UBUNTU_AMI]))
        # AWS's managed policies (AmazonRoute53FullAccess...) exist only when moto is told to load them.
        env = {**os.environ, "MOTO_IAM_LOAD_MANAGED_POLICIES": "true", "MOTO_AMIS_PATH": str(amis)}
        self.process = subprocess.Popen([sys.executable, "-c", _SERVE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env)
        port = self.process.stdout.readline().strip()
        if not port.isdigit():
            self.stop()
            raise RuntimeError("moto's server did not start")
        self.endpoint = f"http://127.0.0.1:{port}"

    def account(self, account_id: str = DEFAULT_ACCOUNT) -> "Account":
        """An account of this server: the default one with static keys, any other through credentials of a
        role assumed in it (moto maps them to that account, as AWS does)."""
        credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        if account_id != DEFAULT_ACCOUNT:
            sts = boto3.client("sts", endpoint_url=self.endpoint, region_name=REGION,
                               aws_access_key_id="testing", aws_secret_access_key="testing")
            found = sts.assume_role(RoleArn=f"arn:aws:iam::{account_id}:role/operator",
                                    RoleSessionName="katforge-tests")["Credentials"]
            credentials = {"AWS_ACCESS_KEY_ID": found["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": found["SecretAccessKey"],
                           "AWS_SESSION_TOKEN": found["SessionToken"]}
        return Account(self, account_id, credentials)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        shutil.rmtree(self.scratch, ignore_errors=True)


@dataclass
class Account:
    """One account of the server, and what a builder made in it (IDs moto chose, for the tests to check)."""
    server: MotoServer
    account_id: str
    credentials: dict[str, str]
    made: dict[str, Any] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """What boto3 needs to reach this account and nothing of the caller's own AWS setup."""
        return {"AWS_ENDPOINT_URL": self.server.endpoint, "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION,
                "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                "AWS_EC2_METADATA_DISABLED": "true", **self.credentials}

    def client(self, service: str):
        return boto3.client(service, endpoint_url=self.server.endpoint, region_name=REGION,
                            aws_access_key_id=self.credentials["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.credentials["AWS_SECRET_ACCESS_KEY"],
                            aws_session_token=self.credentials.get("AWS_SESSION_TOKEN"))


def operators_key() -> str:
    """The key the stack's sshPublicKey holds (the offline plan's), as EC2 returns an imported key: the same
    type and key, another comment (the pair's name)."""
    kind, blob, *_ = OPERATOR_PLACEHOLDERS["sshPublicKey"].split()
    return f"{kind} {blob} katforge-operators"


def _zones(account: Account) -> dict[str, str]:
    route53 = account.client("route53")
    return {name: route53.create_hosted_zone(Name=name, CallerReference=str(uuid.uuid4()))["HostedZone"]["Id"]
            .rsplit("/", 1)[1] for name in ZONES}


def _records(route53, zone_id: str, records: list[tuple[str, str, int, list[str]]]) -> None:
    route53.change_resource_record_sets(HostedZoneId=zone_id, ChangeBatch={"Changes": [
        {"Action": "CREATE", "ResourceRecordSet": {"Name": name, "Type": type_, "TTL": ttl,
                                                   "ResourceRecords": [{"Value": v} for v in values]}}
        for name, type_, ttl, values in records]})


def _instance(ec2, *, ami: dict, instance_type: str, subnet: str, group: str, root_gb: int, volume_type: str,
              name: str, private_ip: str | None = None) -> str:
    extra = {"PrivateIpAddress": private_ip} if private_ip else {}
    return ec2.run_instances(
        ImageId=ami["ImageId"], MinCount=1, MaxCount=1, InstanceType=instance_type, SubnetId=subnet,
        SecurityGroupIds=[group], KeyName="katforge-operators",
        BlockDeviceMappings=[{"DeviceName": ami["RootDeviceName"], "Ebs": {
            "VolumeSize": root_gb, "VolumeType": volume_type, "Encrypted": False, "DeleteOnTermination": True}}],
        MetadataOptions={"HttpEndpoint": "enabled", "HttpTokens": "optional", "HttpPutResponseHopLimit": 2},
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": name}]}], **extra,
    )["Instances"][0]["InstanceId"]


def _ingress(ec2, group: str, protocol: str, port: int, *, cidr: str | None = None, source_group: str | None = None,
             why: str) -> None:
    peer = ({"IpRanges": [{"CidrIp": cidr, "Description": why}]} if cidr
            else {"UserIdGroupPairs": [{"GroupId": source_group, "Description": why}]})
    ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[
        {"IpProtocol": protocol, "FromPort": port, "ToPort": port, **peer}])


def build_live(account: Account) -> Account:
    made = account.made
    ec2 = account.client("ec2")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    subnets = {s["CidrBlock"]: s["SubnetId"] for s in ec2.describe_subnets(
        Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]}
    k3s_subnet = next(cidr for cidr in subnets
                      if ipaddress.ip_address(K3S_PRIVATE_IP) in ipaddress.ip_network(cidr))
    [ami] = ec2.describe_images(ImageIds=[UBUNTU_AMI["ami_id"]])["Images"]
    ec2.import_key_pair(KeyName="katforge-operators", PublicKeyMaterial=operators_key().encode())

    vpn_sg = ec2.create_security_group(GroupName="wireguard", Description="launch-wizard-2", VpcId=vpc)["GroupId"]
    _ingress(ec2, vpn_sg, "udp", 51820, cidr="0.0.0.0/0", why="wireguard")
    _ingress(ec2, vpn_sg, "tcp", 22, cidr="0.0.0.0/0", why="ssh")
    k3s_sg = ec2.create_security_group(GroupName="k3s", Description="launch-wizard-1", VpcId=vpc)["GroupId"]
    _ingress(ec2, k3s_sg, "tcp", 80, cidr="0.0.0.0/0", why="http")
    _ingress(ec2, k3s_sg, "tcp", 443, cidr="0.0.0.0/0", why="https")
    _ingress(ec2, k3s_sg, "tcp", 6443, source_group=vpn_sg, why="kubectl over the vpn")
    _ingress(ec2, k3s_sg, "tcp", 22, source_group=vpn_sg, why="ssh over the vpn")
    _ingress(ec2, k3s_sg, "tcp", 22, cidr=ADMIN_CIDR, why="ssh from the office")
    _ingress(ec2, k3s_sg, "tcp", 5432, cidr="172.31.0.0/16", why="postgres")

    k3s = _instance(ec2, ami=ami, instance_type="t3.medium", subnet=subnets[k3s_subnet], group=k3s_sg, root_gb=30,
                    volume_type="gp3", name="katforge-k3s", private_ip=K3S_PRIVATE_IP)
    vpn = _instance(ec2, ami=ami, instance_type="t2.nano", subnet=subnets[VPN_SUBNET], group=vpn_sg, root_gb=20,
                    volume_type="gp2", name="katforge-vpn")
    for role, instance, address in (("k3s", k3s, K3S_PUBLIC_IP), ("vpn", vpn, VPN_PUBLIC_IP)):
        allocation = ec2.allocate_address(Domain="vpc", Address=address)["AllocationId"]
        association = ec2.associate_address(AllocationId=allocation, InstanceId=instance)["AssociationId"]
        made[role] = {"instance": instance, "allocation": allocation, "association": association}
    made["k3s"].update(subnet=subnets[k3s_subnet], group=k3s_sg)
    made["vpn"].update(subnet=subnets[VPN_SUBNET], group=vpn_sg)

    iam = account.client("iam")
    iam.create_user(UserName="traefik-dns-challenge")
    iam.attach_user_policy(UserName="traefik-dns-challenge", PolicyArn=ROUTE53_FULL_ACCESS)
    iam.create_user(UserName="ses-sender")
    iam.put_user_policy(UserName="ses-sender", PolicyName="ses-send", PolicyDocument=(
        '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "ses:SendRawEmail", "Resource": "*"}]}'))
    for user in ("traefik-dns-challenge", "ses-sender"):
        iam.create_access_key(UserName=user)
    made["oidc"] = iam.create_open_id_connect_provider(
        Url="https://token.actions.githubusercontent.com", ClientIDList=["sts.amazonaws.com"],
        ThumbprintList=[GITHUB_THUMBPRINT])["OpenIDConnectProviderArn"]

    ses = account.client("ses")
    verification = ses.verify_domain_identity(Domain="katforge.com")["VerificationToken"]
    made["dkim"] = sorted(ses.verify_domain_dkim(Domain="katforge.com")["DkimTokens"])
    ses.create_configuration_set(ConfigurationSet={"Name": "katforge"})

    made["zones"] = zones = _zones(account)
    route53 = account.client("route53")
    _records(route53, zones["katforge.com"], [
        ("katforge.com", "A", LIVE_TTL, [K3S_PUBLIC_IP]),
        ("www.katforge.com", "CNAME", LIVE_TTL, ["katforge.com"]),
        ("api.katforge.com", "CNAME", LIVE_TTL, ["katforge.com"]),
        ("k3s.katforge.com", "A", LIVE_TTL, [K3S_PUBLIC_IP]),
        ("vpn.katforge.com", "A", LIVE_TTL, [VPN_PUBLIC_IP]),
        ("qa.katforge.com", "A", LIVE_TTL, [K3S_PRIVATE_IP]),
        ("qa.api.katforge.com", "A", LIVE_TTL, [K3S_PRIVATE_IP]),
        ("_amazonses.katforge.com", "TXT", LIVE_TTL, [f'"{verification}"']),
        *[(f"{token}._domainkey.katforge.com", "CNAME", DKIM_TTL, [f"{token}.dkim.amazonses.com"])
          for token in made["dkim"]],
    ])
    _records(route53, zones["stumper.gg"], [("stumper.gg", "A", LIVE_TTL, [K3S_PUBLIC_IP])])
    return account


def build_empty(account: Account) -> Account:
    account.made["zones"] = _zones(account)
    return account


@pytest.fixture(scope="session")
def moto_server():
    server = MotoServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def live_account(moto_server):
    """The live estate's account (moto's default account, 123456789012). Read it only: a test that
    changes an account builds its own, `build_live(moto_server.account("<12 digits>"))`."""
    return build_live(moto_server.account())


@pytest.fixture(scope="session")
def empty_account(moto_server):
    """An account with the two hosted zones and nothing else, reached with assumed-role credentials."""
    return build_empty(moto_server.account(EMPTY_ACCOUNT))


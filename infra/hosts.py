"""The two EC2 hosts (k3s and VPN), their SSH key pair and their Elastic IPs.

The k3s host holds the production database, so it is protected, termination-protected, and deaf to
changes (a newer AMI, new user data, a rotated key pair) that would otherwise replace it. Live
instances and addresses are imported when their IDs are configured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pulumi
import pulumi_aws as aws

from infra.network import Network
from infra.settings import HostSettings, HostSpec, invalid

CANONICAL = "099720109477"  # the owner of the official Ubuntu AMIs
UBUNTU_2404 = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"  # ships postgresql-16
VPN_ROOT_GB = 8
# Only first boot reads these; changing them must never replace a host that holds state.
LAUNCH_ONLY = ["ami", "userData", "keyName"]


@dataclass(frozen=True)
class HostRole:
    name: str
    spec: HostSpec
    root_gb: int
    private_ip: Optional[str]
    security_group: aws.ec2.SecurityGroup
    forwards_packets: bool  # the VPN routes its clients' traffic, so AWS must not drop it
    instance_profile: Optional[pulumi.Input[str]] = None


def check_adopted_address(role: str, spec: HostSpec, address: str) -> str:
    """An imported Elastic IP must be the one the DNS and the spec point at."""
    if spec.eip_allocation_id and address != spec.expected_public_ip:
        raise invalid(f"{role}EipAllocationId", spec.eip_allocation_id,
                      f"the allocation of katforge:{role}PublicIp {spec.expected_public_ip}, but it holds {address}: "
                      "is this the right allocation?")
    return address


class Host(pulumi.ComponentResource):
    """One instance and its Elastic IP."""

    def __init__(self, role: HostRole, ami_id: str, subnet_id: str, key_name: pulumi.Input[str],
                 opts: pulumi.ResourceOptions):
        super().__init__("katforge:hosts:Host", role.name, None, opts)
        spec = role.spec
        self.instance = aws.ec2.Instance(
            role.name,
            ami=ami_id,
            instance_type=spec.instance_type,
            subnet_id=subnet_id,
            private_ip=role.private_ip,
            vpc_security_group_ids=[role.security_group.id],
            key_name=key_name,
            iam_instance_profile=role.instance_profile,
            source_dest_check=not role.forwards_packets,
            disable_api_termination=True,
            metadata_options=aws.ec2.InstanceMetadataOptionsArgs(
                http_endpoint="enabled",
                http_tokens="required",  # IMDSv2 only
                http_put_response_hop_limit=1,  # one hop: pods cannot borrow the host's role
            ),
            root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(
                volume_size=role.root_gb, volume_type="gp3", encrypted=True, delete_on_termination=True,
            ),
            tags={"Name": role.name},
            opts=pulumi.ResourceOptions(parent=self, protect=True, ignore_changes=LAUNCH_ONLY,
                                        import_=spec.instance_id or None),
        )
        # Losing the address would break every DNS name, so it is protected like the host.
        self.eip = aws.ec2.Eip(
            role.name,
            domain="vpc",
            instance=self.instance.id,
            tags={"Name": role.name},
            opts=pulumi.ResourceOptions(parent=self, protect=True, import_=spec.eip_allocation_id or None),
        )
        self.public_ip = self.eip.public_ip.apply(lambda ip: check_adopted_address(role.name, spec, ip))
        self.register_outputs({"instance_id": self.instance.id, "public_ip": self.public_ip})


class Hosts(pulumi.ComponentResource):
    def __init__(self, name: str, hosts: HostSettings, k3s_private_ip: str, network: Network,
                 instance_profile: Optional[pulumi.Input[str]] = None,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("katforge:hosts:Hosts", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        ami = aws.ec2.get_ami(most_recent=True, owners=[CANONICAL],
                              filters=[aws.ec2.GetAmiFilterArgs(name="name", values=[UBUNTU_2404])],
                              opts=pulumi.InvokeOptions(parent=self))
        key = aws.ec2.KeyPair("operators", key_name="katforge-operators", public_key=hosts.ssh_public_key,
                              opts=child)
        self.k3s = Host(HostRole("k3s", hosts.k3s, hosts.root_volume_gb, k3s_private_ip, network.k3s_sg,
                                 forwards_packets=False, instance_profile=instance_profile),
                        ami.id, network.subnet_id, key.key_name, child)
        self.vpn = Host(HostRole("vpn", hosts.vpn, VPN_ROOT_GB, None, network.vpn_sg, forwards_packets=True),
                        ami.id, network.subnet_id, key.key_name, child)
        self.register_outputs({"k3s_public_ip": self.k3s.public_ip, "vpn_public_ip": self.vpn.public_ip})

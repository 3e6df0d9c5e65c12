"""The two EC2 hosts (k3s and VPN), their SSH key pair, and the association of each with its Elastic IP;
and the k3s agents (katforge:k3sAgents), if any.

The k3s host holds the production database, so it is protected, termination-protected, and deaf to
changes (a newer AMI, new user data, a rotated key pair) that would otherwise replace it. Live
instances are imported when `katforge:imports` names them, and keep what cannot change in place on a
live instance (root volume encryption, subnet: config) and what their live security groups allow
(the keep lists).

An agent holds no state (its pods' data lives in PostgreSQL; local-path volumes stay on the k3s host
with Traefik): it is neither protected nor termination-protected, its root volume goes with it, and
removing its line from the config drains the node (infra/bootstrap.py) and then deletes the instance.
It has no Elastic IP: the default subnet's public address gives it the internet (images, packages; the
default VPC has no NAT), and its security group admits only the other nodes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pulumi
import pulumi_aws as aws

from infra import adopt
from infra.addresses import Address, Addresses
from infra.network import Network
from infra.policies import ESTATE_TAG
from infra.settings import AgentSpec, HostSettings, HostSpec, RootVolume

CANONICAL = "099720109477"  # the owner of the official Ubuntu AMIs
UBUNTU_2404 = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"  # ships postgresql-16
# Only first boot reads these; changing them must never replace a host that holds state.
LAUNCH_ONLY = ["ami", "userData", "keyName"]
# The tag that tells an agent's instance (stateless, unprotected) from the hosts (policy/rules.py).
AGENT_TAG = ("Role", "k3s-agent")
# An agent's disk holds the OS, k3s and the images its pods run: nothing to keep.
AGENT_ROOT_VOLUME = RootVolume(size_gb=20, type="gp3", encrypted=True)


@dataclass(frozen=True)
class HostRole:
    name: str
    spec: HostSpec
    private_ip: Optional[str]
    subnet_id: str
    security_group: aws.ec2.SecurityGroup
    forwards_packets: bool  # the VPN routes its clients' traffic, so AWS must not drop it
    # The k3s host's root volume holds PostgreSQL's data: it outlives the instance, whatever ends it.
    # The VPN's holds only its WireGuard key (peers live in config): a volume left behind would keep
    # that private key lying around unattached, while a lost key costs each peer one line of config.
    keep_root_volume: bool
    instance_profile: Optional[pulumi.Input[str]] = None
    # The rules of security_group (Network.rules_of): in place before the instance joins the group.
    group_rules: tuple[pulumi.Resource, ...] = ()
    holds_state: bool = True  # protected and termination-protected; False for an agent
    tags: tuple[tuple[str, str], ...] = ()


class Host(pulumi.ComponentResource):
    """One instance, attached to its Elastic IP (agents have none)."""

    def __init__(self, role: HostRole, ami_id: str, key_name: pulumi.Input[str], address: Optional[Address],
                 opts: pulumi.ResourceOptions):
        super().__init__("katforge:hosts:Host", role.name, None, opts)
        spec = role.spec
        volume = spec.root_volume
        self.instance = aws.ec2.Instance(
            role.name,
            ami=ami_id,
            instance_type=spec.instance_type,
            subnet_id=role.subnet_id,
            private_ip=role.private_ip,
            # The live groups kept beside the program's own: adopting a host drops nothing they allow.
            vpc_security_group_ids=[role.security_group.id, *spec.keep_security_groups],
            key_name=key_name,
            iam_instance_profile=role.instance_profile,
            source_dest_check=not role.forwards_packets,
            disable_api_termination=role.holds_state,
            # An agent reaches the internet at its subnet's public address (hosts at their Elastic IPs).
            **({} if role.holds_state else {"associate_public_ip_address": True}),
            metadata_options=aws.ec2.InstanceMetadataOptionsArgs(
                http_endpoint="enabled",
                http_tokens="required",  # IMDSv2 only
                http_put_response_hop_limit=1,  # one hop: pods cannot borrow the host's role
            ),
            root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(
                volume_size=volume.size_gb, volume_type=volume.type, encrypted=volume.encrypted,
                delete_on_termination=not role.keep_root_volume,
            ),
            # The estate's tag, on the instance and its root volume, is what lets the deploy role change
            # them (infra/policies.py): the first `pulumi up` by an operator puts it on live hosts.
            tags={"Name": role.name, ESTATE_TAG[0]: ESTATE_TAG[1], **dict(role.tags)},
            volume_tags={ESTATE_TAG[0]: ESTATE_TAG[1]},
            # An agent's replacement goes first (its node drained and deleted, infra/bootstrap.py): k3s
            # refuses a second node of the same name.
            # The group's rules first: adopting a live host swaps it onto the program's group, which must
            # already allow what the live one did (SSH, the k3s API, WireGuard) when the swap happens.
            opts=pulumi.ResourceOptions(parent=self, protect=role.holds_state, ignore_changes=LAUNCH_ONLY,
                                        depends_on=list(role.group_rules),
                                        delete_before_replace=not role.holds_state,
                                        import_=adopt.import_id("Instance", role.name)),
        )
        if address is None:
            self.public_ip = None
            self.register_outputs({"instance_id": self.instance.id})
            return
        # Every input is fixed once both ends exist, so only a new instance or address replaces it.
        # Protected: a replacement moves the public address. The default create-then-delete order is
        # the right one for a new instance: AssociateAddress moves the address over at once (AWS
        # reassociates by default), and deleting the old association then finds it gone, which the
        # provider ignores (terraform-provider-aws ec2_eip_association.go @01c08000ddb1, Delete).
        self.association = aws.ec2.EipAssociation(
            role.name, allocation_id=address.eip.allocation_id, instance_id=self.instance.id,
            opts=pulumi.ResourceOptions(parent=self, protect=True,
                                        import_=adopt.import_id("EipAssociation", role.name)))
        # The address as the host answers at it: once attached, so nothing connects to it before.
        self.public_ip = pulumi.Output.all(address.public_ip, self.association.id).apply(lambda values: values[0])
        self.register_outputs({"instance_id": self.instance.id, "public_ip": self.public_ip})


class Hosts(pulumi.ComponentResource):
    def __init__(self, name: str, hosts: HostSettings, k3s_private_ip: str, network: Network, addresses: Addresses,
                 instance_profile: Optional[pulumi.Input[str]] = None,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("katforge:hosts:Hosts", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        ami = aws.ec2.get_ami(most_recent=True, owners=[CANONICAL],
                              filters=[aws.ec2.GetAmiFilterArgs(name="name", values=[UBUNTU_2404])],
                              opts=pulumi.InvokeOptions(parent=self))
        # The name is fixed, so a replacement (a new public key) must delete the old pair first: EC2
        # refuses a second pair of that name. Running hosts never notice: a key pair only seeds a new
        # instance's authorized_keys, and the hosts ignore keyName.
        # An adopted pair keeps the public key it holds: publicKey is force-new, and an import reads it as
        # EC2 returns it (DescribeKeyPairs with IncludePublicKey: its own comment, or nothing at all from a
        # provider that does not ask; terraform-provider-aws ec2_key_pair.go, resourceKeyPairRead), so any
        # text but that one would replace the pair on the first `up`. make preflight flags a live pair
        # that holds another key than sshPublicKey; moving it to a new key is `pulumi up --replace`.
        key_import = adopt.import_id("KeyPair", "operators")
        key = aws.ec2.KeyPair("operators", key_name="katforge-operators", public_key=hosts.ssh_public_key,
                              opts=pulumi.ResourceOptions(parent=self, delete_before_replace=True, import_=key_import,
                                                          ignore_changes=["publicKey"] if key_import else None))
        self.k3s = Host(HostRole("k3s", hosts.k3s, k3s_private_ip, network.k3s_subnet_id, network.k3s_sg,
                                 forwards_packets=False, keep_root_volume=True, instance_profile=instance_profile,
                                 group_rules=tuple(network.rules_of(network.k3s_sg))),
                        ami.id, key.key_name, addresses.k3s, child)
        self.vpn = Host(HostRole("vpn", hosts.vpn, None, network.vpn_subnet_id, network.vpn_sg,
                                 forwards_packets=True, keep_root_volume=False,
                                 group_rules=tuple(network.rules_of(network.vpn_sg))),
                        ami.id, key.key_name, addresses.vpn, child)
        self.agents = {agent.name: Host(agent_role(agent, network), ami.id, key.key_name, None, child)
                       for agent in hosts.k3s_agents}
        self.register_outputs({"k3s_public_ip": self.k3s.public_ip, "vpn_public_ip": self.vpn.public_ip})


def agent_role(agent: AgentSpec, network: Network) -> HostRole:
    spec = HostSpec(instance_type=agent.instance_type, expected_public_ip="", root_volume=AGENT_ROOT_VOLUME,
                    keep_security_groups=())
    return HostRole(agent.name, spec, agent.private_ip, network.agent_subnet_ids[agent.private_ip], network.agent_sg,
                    forwards_packets=False, keep_root_volume=False, group_rules=tuple(network.rules_of(network.agent_sg)),
                    holds_state=False, tags=(AGENT_TAG,))

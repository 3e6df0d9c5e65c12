"""The default VPC and the hosts' subnets (looked up, never created) and the two hosts' security groups.

Each rule is one row of data with the reason it exists; nothing else is open. The groups are the
program's own (new, named by Pulumi): a live host keeps its live groups beside them as long as the
keep lists say (infra/hosts.py).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from infra.policies import ESTATE_TAG
from infra.settings import NetworkSettings, invalid

ANYWHERE = "0.0.0.0/0"
# Groups and rules carry the estate's tag: the deploy role may change only tagged ones (infra/policies.py).
TAGS = {ESTATE_TAG[0]: ESTATE_TAG[1]}
# Rule sources that are addresses of the estate, known once deployed:
VPN_SG = "vpn-security-group"  # the VPN host's private address, which its clients are NATed behind
VPN_ADDRESS = "vpn-address"  # the VPN's Elastic IP, the source of its clients' packets to public names


@dataclass(frozen=True)
class Rule:
    protocol: str
    port: int
    sources: tuple[str, ...]  # CIDRs, VPN_SG or VPN_ADDRESS
    why: str


def k3s_rules(net: NetworkSettings) -> tuple[Rule, ...]:
    # VPN clients reach the private address through the VPN's security group, and the public
    # names (k3s.katforge.com) from the VPN's Elastic IP: the real one, imported or new.
    operators = (VPN_SG, VPN_ADDRESS, *net.admin_cidrs)
    return (
        Rule("tcp", 80, (ANYWHERE,), "HTTP for the public sites; Traefik redirects it to HTTPS"),
        Rule("tcp", 443, (ANYWHERE,), "HTTPS for the public sites"),
        Rule("tcp", 6443, tuple(dict.fromkeys(operators + net.k3s_api_cidrs)),
             "k3s API for kubectl and the deploy workflow (through the VPN)"),
        Rule("tcp", 22, operators, "SSH for operators and the Pulumi host bootstrap"),
        Rule("tcp", 5432, (net.vpc_cidr,), "PostgreSQL for hosts inside the VPC only"),
    )


def vpn_rules(net: NetworkSettings) -> tuple[Rule, ...]:
    return (
        Rule("udp", net.wireguard_port, (ANYWHERE,), "WireGuard clients connect from anywhere"),
        Rule("tcp", 22, net.admin_cidrs, "SSH for operators to administer the VPN host"),
    )


def subnet_cidr_of(ip: str) -> str:
    """AWS creates a default VPC's subnets as /20s; the host's subnet is the /20 holding its IP."""
    return str(ipaddress.IPv4Network(f"{ip}/20", strict=False))


class Network(pulumi.ComponentResource):
    def __init__(self, name: str, net: NetworkSettings, vpn_address: pulumi.Input[str], vpn_subnet_id: str = "",
                 opts: pulumi.ResourceOptions | None = None):
        """`vpn_address`: the VPN's Elastic IP; `vpn_subnet_id`: the VPN host's subnet, "" for the k3s host's."""
        super().__init__("katforge:network:Network", name, None, opts)
        invoke = pulumi.InvokeOptions(parent=self)
        vpc = aws.ec2.get_vpc(default=True, opts=invoke)
        if vpc.cidr_block != net.vpc_cidr:
            raise invalid("vpcCidr", net.vpc_cidr, f"the default VPC's CIDR: {vpc.id} is {vpc.cidr_block}")
        self.vpc_id = vpc.id
        self.k3s_subnet_id = aws.ec2.get_subnet(vpc_id=vpc.id, cidr_block=subnet_cidr_of(net.k3s_private_ip),
                                                opts=invoke).id
        self.vpn_subnet_id = self.k3s_subnet_id
        if vpn_subnet_id:
            subnet = aws.ec2.get_subnet(id=vpn_subnet_id, opts=invoke)
            if subnet.vpc_id != vpc.id:
                raise invalid("vpnSubnetId", vpn_subnet_id, f"a subnet of the default VPC {vpc.id}, but it is in "
                                                            f"{subnet.vpc_id}")
            self.vpn_subnet_id = subnet.id
        self.vpn_address = pulumi.Output.from_input(vpn_address)

        self.vpn_sg = self._group("vpn", "WireGuard VPN host", vpn_rules(net), source_sg=None)
        self.k3s_sg = self._group("k3s", "k3s host: sites, k3s API, SSH, PostgreSQL", k3s_rules(net),
                                  source_sg=self.vpn_sg)
        self.register_outputs({"vpc_id": self.vpc_id, "k3s_sg": self.k3s_sg.id, "vpn_sg": self.vpn_sg.id})

    def _source(self, source: str, source_sg: aws.ec2.SecurityGroup | None) -> tuple[dict, str]:
        """A rule's peer and the label its resource name gets."""
        if source == VPN_SG:
            return dict(referenced_security_group_id=source_sg.id), "vpn"
        if source == VPN_ADDRESS:
            return dict(cidr_ipv4=self.vpn_address.apply(lambda ip: f"{ip}/32")), VPN_ADDRESS
        return dict(cidr_ipv4=source), source.replace("/", "-")

    def _group(self, name: str, description: str, rules: tuple[Rule, ...],
               source_sg: aws.ec2.SecurityGroup | None) -> aws.ec2.SecurityGroup:
        child = pulumi.ResourceOptions(parent=self)
        group = aws.ec2.SecurityGroup(name, vpc_id=self.vpc_id, description=description,
                                      tags={"Name": name, **TAGS}, opts=child)
        in_group = pulumi.ResourceOptions(parent=group)
        for rule in rules:
            for source in rule.sources:
                peer, label = self._source(source, source_sg)
                aws.vpc.SecurityGroupIngressRule(
                    f"{name}-{rule.protocol}{rule.port}-from-{label}", security_group_id=group.id,
                    ip_protocol=rule.protocol, from_port=rule.port, to_port=rule.port,
                    description=rule.why, tags=TAGS, **peer, opts=in_group)
        aws.vpc.SecurityGroupEgressRule(f"{name}-egress", security_group_id=group.id, ip_protocol="-1",
                                        cidr_ipv4=ANYWHERE, description="outbound: packages, ACME, SES, S3",
                                        tags=TAGS, opts=in_group)
        return group

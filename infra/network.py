"""The default VPC and the hosts' subnets (looked up, never created) and the hosts' security groups.

Each rule is one row of data with the reason it exists; nothing else is open. The groups are the
program's own (new, named by Pulumi): a live host keeps its live groups beside them as long as the
keep lists say (infra/hosts.py). With k3s agents (katforge:k3sAgents) the agents share one group, and
the nodes admit each other's node-to-node traffic only; with RDS, its group admits the nodes only.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Sequence

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
K3S_SG = "k3s-security-group"  # the k3s host (the server node)
AGENT_SG = "agent-security-group"  # the k3s agents
# What a source group is called in its rules' resource names.
GROUP_LABELS = {VPN_SG: "vpn", K3S_SG: "k3s", AGENT_SG: "agents"}
NODES = (K3S_SG, AGENT_SG)


@dataclass(frozen=True)
class Rule:
    protocol: str
    port: int
    sources: tuple[str, ...]  # CIDRs, VPN_SG or VPN_ADDRESS
    why: str


def k3s_rules(net: NetworkSettings, agents: bool = False) -> tuple[Rule, ...]:
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
        *(node_rules((AGENT_SG,)) + (Rule("tcp", 6443, (AGENT_SG,), "k3s API for the agents (k3s agent and kubelet)"),)
          if agents else ()),
    )


def node_rules(sources: tuple[str, ...]) -> tuple[Rule, ...]:
    """What a node admits from the other nodes (`sources`): k3s's "Inbound Rules for K3s Server Nodes" for flannel's
    default VXLAN backend (docs.k3s.io, Installation Requirements, Networking: UDP 8472 "Required only
    for Flannel VXLAN", TCP 10250 "Kubelet metrics", sources "All nodes"). Not 2379-2380 (one server,
    SQLite), nor WireGuard's 51820-51821 or Spegel's 5001 (not used)."""
    return (Rule("udp", 8472, sources, "flannel VXLAN: pod traffic between the k3s nodes"),
            Rule("tcp", 10250, sources, "kubelet: logs, exec and metrics-server between the k3s nodes"))


def agent_rules() -> tuple[Rule, ...]:
    return (*node_rules(NODES),
            Rule("tcp", 22, (K3S_SG,), "SSH for the Pulumi bootstrap, through the k3s host as jump host"))


def rds_rules() -> tuple[Rule, ...]:
    return (Rule("tcp", 5432, NODES, "PostgreSQL for the k3s nodes (pods leave a node as its address) only"),)


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
                 agent_ips: Sequence[str] = (), rds: bool = False, opts: pulumi.ResourceOptions | None = None):
        """`vpn_address`: the VPN's Elastic IP; `vpn_subnet_id`: the VPN host's subnet, "" for the k3s host's;
        `agent_ips`: the k3s agents' private addresses; `rds`: whether the RDS instance exists."""
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
        # Each agent's subnet: the default VPC's /20 holding its address.
        self.agent_subnet_ids = {ip: aws.ec2.get_subnet(vpc_id=vpc.id, cidr_block=subnet_cidr_of(ip), opts=invoke).id
                                 for ip in agent_ips}

        self.groups: dict[str, aws.ec2.SecurityGroup] = {}
        # Each group's rule resources: what an instance that joins the group waits for (rules_of).
        self.rules: dict[aws.ec2.SecurityGroup, list[pulumi.Resource]] = {}
        self.vpn_sg = self._group(VPN_SG, "vpn", "WireGuard VPN host")
        self.k3s_sg = self._group(K3S_SG, "k3s", "k3s host: sites, k3s API, SSH, PostgreSQL")
        self.agent_sg = self._group(AGENT_SG, "k3s-agents", "k3s agents: node-to-node traffic only") \
            if agent_ips else None
        self.rds_sg = self._group("rds", "rds", "RDS PostgreSQL: the k3s nodes only") if rds else None
        self._rules("vpn", self.vpn_sg, vpn_rules(net))
        self._rules("k3s", self.k3s_sg, k3s_rules(net, agents=bool(agent_ips)))
        if self.agent_sg:
            self._rules("k3s-agents", self.agent_sg, agent_rules())
        if self.rds_sg:  # RDS opens no connection of its own: no egress
            self._rules("rds", self.rds_sg, rds_rules(), egress=False)
        self.register_outputs({"vpc_id": self.vpc_id, "k3s_sg": self.k3s_sg.id, "vpn_sg": self.vpn_sg.id})

    def _source(self, source: str) -> tuple[dict, str] | None:
        """A rule's peer and the label its resource name gets; None for a group that does not exist."""
        if source in GROUP_LABELS:
            group = self.groups.get(source)
            return (dict(referenced_security_group_id=group.id), GROUP_LABELS[source]) if group else None
        if source == VPN_ADDRESS:
            return dict(cidr_ipv4=self.vpn_address.apply(lambda ip: f"{ip}/32")), VPN_ADDRESS
        return dict(cidr_ipv4=source), source.replace("/", "-")

    def _group(self, key: str, name: str, description: str) -> aws.ec2.SecurityGroup:
        self.groups[key] = aws.ec2.SecurityGroup(name, vpc_id=self.vpc_id, description=description,
                                                 tags={"Name": name, **TAGS}, opts=pulumi.ResourceOptions(parent=self))
        return self.groups[key]

    def rules_of(self, group: aws.ec2.SecurityGroup) -> list[pulumi.Resource]:
        """The rules of one of the groups: an instance that joins the group depends on them, so a live host
        swapped onto the program's group (its first `up`) finds SSH, the k3s API and WireGuard already open,
        never an empty group for the seconds between (a group's rules are resources of their own)."""
        return list(self.rules.get(group, []))

    def _rules(self, name: str, group: aws.ec2.SecurityGroup, rules: tuple[Rule, ...], egress: bool = True) -> None:
        in_group = pulumi.ResourceOptions(parent=group)
        made = self.rules.setdefault(group, [])
        for rule in rules:
            for peer, label in filter(None, map(self._source, rule.sources)):
                made.append(aws.vpc.SecurityGroupIngressRule(
                    f"{name}-{rule.protocol}{rule.port}-from-{label}", security_group_id=group.id,
                    ip_protocol=rule.protocol, from_port=rule.port, to_port=rule.port,
                    description=rule.why, tags=TAGS, **peer, opts=in_group))
        if egress:
            made.append(aws.vpc.SecurityGroupEgressRule(
                f"{name}-egress", security_group_id=group.id, ip_protocol="-1", cidr_ipv4=ANYWHERE,
                description="outbound: packages, ACME, SES, S3", tags=TAGS, opts=in_group))

"""The two hosts' Elastic IPs, allocated on their own before anything that needs their addresses.

The VPN's address is a source of the k3s host's security group rules, so it exists before the network
and the hosts; each is attached to its host by an EipAssociation (infra/hosts.py) once the host exists.
An address held by a host would be gone with it: allocated apart, it outlives a replaced host, and every
DNS name and VPN client keeps pointing at it. Both are protected.
"""
from __future__ import annotations

from typing import Optional

import pulumi
import pulumi_aws as aws

from infra import adopt
from infra.policies import ESTATE_TAG
from infra.settings import HostSettings, HostSpec, invalid


def check_adopted_address(role: str, spec: HostSpec, allocation_id: Optional[str], address: str) -> str:
    """An imported Elastic IP must be the one the DNS and the spec point at."""
    if allocation_id and address != spec.expected_public_ip:
        raise invalid("imports", f"Eip:{role}={allocation_id}",
                      f"the allocation of katforge:{role}PublicIp {spec.expected_public_ip}, but it holds {address}: "
                      "is this the right allocation?")
    return address


class Address:
    """One host's Elastic IP and its address (checked against the config when imported)."""

    def __init__(self, role: str, spec: HostSpec, parent: pulumi.Resource):
        live = adopt.import_id("Eip", role)
        # The estate's tag lets the deploy role move the address (infra/policies.py).
        self.eip = aws.ec2.Eip(role, domain="vpc", tags={"Name": role, ESTATE_TAG[0]: ESTATE_TAG[1]},
                               opts=pulumi.ResourceOptions(parent=parent, protect=True, import_=live))
        self.public_ip = self.eip.public_ip.apply(lambda ip: check_adopted_address(role, spec, live, ip))


class Addresses(pulumi.ComponentResource):
    def __init__(self, name: str, hosts: HostSettings, opts: pulumi.ResourceOptions | None = None):
        super().__init__("katforge:addresses:Addresses", name, None, opts)
        self.k3s = Address("k3s", hosts.k3s, self)
        self.vpn = Address("vpn", hosts.vpn, self)
        self.register_outputs({"k3s_public_ip": self.k3s.public_ip, "vpn_public_ip": self.vpn.public_ip})

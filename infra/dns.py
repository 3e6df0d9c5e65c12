"""Route53: the spec's domain routing table as data, one record per row, in the stack of its stage.

The hosted zones already exist and are only looked up: creating a zone would hand out new name
servers and take the sites down. A zone whose ID is configured (`katforge:zoneIds`) is looked up by
that ID and must carry its name, so records never land in a stray duplicate zone; a zone without one
is looked up by name, which works in any account that has it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import pulumi
import pulumi_aws as aws

from infra.settings import invalid

# The hosted zones the records go into (their IDs, where known, are config: katforge:zoneIds).
ZONES = ("katforge.com", "stumper.gg")
TTL = 300

# Record targets that are addresses known only at run time.
K3S_PUBLIC = "k3s host Elastic IP"
VPN_PUBLIC = "VPN Elastic IP"
K3S_PRIVATE = "k3s host private IP"


@dataclass(frozen=True)
class DnsRecord:
    name: str
    type: str
    target: str  # one of the targets above, or a host name for a CNAME
    stage: str  # the stack that declares it
    purpose: str


RECORDS = (
    DnsRecord("katforge.com", "A", K3S_PUBLIC, "prod", "web"),
    DnsRecord("www.katforge.com", "CNAME", "katforge.com", "prod", "301 redirect to katforge.com"),
    DnsRecord("api.katforge.com", "CNAME", "katforge.com", "prod", "api"),
    DnsRecord("stumper.gg", "A", K3S_PUBLIC, "prod", "stumper"),
    DnsRecord("k3s.katforge.com", "A", K3S_PUBLIC, "prod", "infra: kubectl"),
    DnsRecord("vpn.katforge.com", "A", VPN_PUBLIC, "prod", "infra: WireGuard"),
    DnsRecord("qa.katforge.com", "A", K3S_PRIVATE, "qa", "qa web (VPN-only)"),
    DnsRecord("qa.api.katforge.com", "A", K3S_PRIVATE, "qa", "qa api (VPN-only)"),
)


def zone_of(name: str) -> str:
    return next(zone for zone in ZONES if name == zone or name.endswith("." + zone))


def resource_name(name: str, type_: str) -> str:
    return f"{name}-{type_.lower()}"


class Zones:
    """The existing public hosted zones: by ID where configured, otherwise by name."""

    def __init__(self, parent: pulumi.Resource, zone_ids: Mapping[str, str]):
        invoke = pulumi.InvokeOptions(parent=parent)
        found = {zone: aws.route53.get_zone(zone_id=zone_ids[zone], opts=invoke) if zone in zone_ids
                 else aws.route53.get_zone(name=zone, private_zone=False, opts=invoke)
                 for zone in ZONES}
        for zone, result in found.items():
            # Route53 may report the name with its final dot.
            if result.name.rstrip(".") != zone or result.private_zone:
                raise invalid("zoneIds", f"{zone}={zone_ids.get(zone, '')}",
                              f"the ID of the public hosted zone {zone}, but {result.zone_id} is "
                              f"{'a private zone' if result.private_zone else 'zone ' + result.name}: "
                              "check the ID in the Route53 console")
        self.ids = {zone: result.zone_id for zone, result in found.items()}
        self.arns = {zone: result.arn for zone, result in found.items()}

    def record(self, name: str, type_: str, values: list[pulumi.Input[str]], parent: pulumi.Resource,
               ttl: int = TTL) -> aws.route53.Record:
        # allow_overwrite adopts a live record in place (an UPSERT), never deleting it first.
        return aws.route53.Record(resource_name(name, type_), zone_id=self.ids[zone_of(name)], name=name,
                                  type=type_, ttl=ttl, records=values, allow_overwrite=True,
                                  opts=pulumi.ResourceOptions(parent=parent))


class Dns(pulumi.ComponentResource):
    def __init__(self, name: str, stage: str, zone_ids: Mapping[str, str], targets: dict[str, pulumi.Input[str]],
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("katforge:dns:Dns", name, None, opts)
        self.zones = Zones(self, zone_ids)
        self.records = {
            row.name: self.zones.record(row.name, row.type,
                                        [row.target if row.type == "CNAME" else targets[row.target]], self)
            for row in RECORDS if row.stage == stage
        }
        self.register_outputs({"zone_ids": self.zones.ids})

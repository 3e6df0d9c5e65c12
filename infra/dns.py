"""Route53: the spec's domain routing table as data, one record per row, in the stack of its stage.

The hosted zones already exist and are only looked up: creating a zone would hand out new name
servers and take the sites down.
"""
from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from infra.settings import SettingsError

# The hosted zones; katforge.com's ID is the one the spec names, so a lookup that finds another zone
# of that name (a stray duplicate) stops the program instead of writing records nobody serves.
ZONES = {"katforge.com": "Z0292557263L1FJT7JXXS", "stumper.gg": None}
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
    """The existing hosted zones, looked up by name."""

    def __init__(self, parent: pulumi.Resource):
        found = {zone: aws.route53.get_zone(name=zone, private_zone=False, opts=pulumi.InvokeOptions(parent=parent))
                 for zone in ZONES}
        for zone, expected in ZONES.items():
            if expected and found[zone].zone_id != expected:
                raise SettingsError(f"the public hosted zone {zone} is {found[zone].zone_id}, not {expected} as the "
                                    "spec says: check for a duplicate zone before any record is written.")
        self.ids = {zone: result.zone_id for zone, result in found.items()}
        self.arns = {zone: result.arn for zone, result in found.items()}

    def record(self, name: str, type_: str, values: list[pulumi.Input[str]], parent: pulumi.Resource,
               ttl: int = TTL) -> aws.route53.Record:
        # allow_overwrite adopts a live record in place (an UPSERT), never deleting it first.
        return aws.route53.Record(resource_name(name, type_), zone_id=self.ids[zone_of(name)], name=name,
                                  type=type_, ttl=ttl, records=values, allow_overwrite=True,
                                  opts=pulumi.ResourceOptions(parent=parent))


class Dns(pulumi.ComponentResource):
    def __init__(self, name: str, stage: str, targets: dict[str, pulumi.Input[str]],
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("katforge:dns:Dns", name, None, opts)
        self.zones = Zones(self)
        self.records = {
            row.name: self.zones.record(row.name, row.type,
                                        [row.target if row.type == "CNAME" else targets[row.target]], self)
            for row in RECORDS if row.stage == stage
        }
        self.register_outputs({"zone_ids": self.zones.ids})

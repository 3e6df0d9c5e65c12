"""IAM policy documents as pure functions, so each permission can be read and tested on its own."""
from __future__ import annotations

import json
import re


def document(*statements: dict) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)}, sort_keys=True)


def normalized_record_name(name: str) -> str:
    """A DNS name as route53:ChangeResourceRecordSetsNormalizedRecordNames compares it: lower case, no
    trailing dot, and every character but a-z, 0-9, '-', '_' and '.' as a backslash and three octal
    digits (Route 53 Developer Guide, "Normalizing Route 53 condition key values")."""
    return "".join(c if re.fullmatch(r"[a-z0-9_.-]", c) else f"\\{ord(c):03o}"
                   for c in name.lower().rstrip("."))


def dns_challenge_policy(zone_arns: list[str], hosts: list[str]) -> str:
    """What Traefik's Route53 DNS-01 solver (lego) needs for `hosts`, and no more (never
    AmazonRoute53FullAccess): the TXT record `_acme-challenge.<host>` of each host, nothing else."""
    challenges = sorted({normalized_record_name(f"_acme-challenge.{host}") for host in hosts})
    return document(
        {
            "Sid": "WriteAcmeChallengeTxtOnly",
            "Effect": "Allow",
            "Action": "route53:ChangeResourceRecordSets",
            "Resource": sorted(zone_arns),
            "Condition": {"ForAllValues:StringEquals": {
                "route53:ChangeResourceRecordSetsRecordTypes": ["TXT"],
                "route53:ChangeResourceRecordSetsNormalizedRecordNames": challenges,
            }},
        },
        # lego reads the TXT record set before it upserts or deletes it.
        {"Sid": "ReadZones", "Effect": "Allow", "Action": "route53:ListResourceRecordSets",
         "Resource": sorted(zone_arns)},
        {"Sid": "WaitForPropagation", "Effect": "Allow", "Action": "route53:GetChange",
         "Resource": "arn:aws:route53:::change/*"},
        # With AWS_HOSTED_ZONE_ID unset lego finds each name's zone by name (go-acme/lego,
        # providers/dns/route53/route53.go, getHostedZoneID). No resource-level restriction exists.
        {"Sid": "FindZone", "Effect": "Allow", "Action": "route53:ListHostedZonesByName", "Resource": "*"},
    )


def ses_send_policy(identity_arn: str, configuration_set_arn: str, from_addresses: list[str]) -> str:
    """Send mail as the katforge.com identity, only from the listed addresses."""
    return document({
        "Sid": "SendFromKnownAddresses",
        "Effect": "Allow",
        "Action": ["ses:SendEmail", "ses:SendRawEmail"],
        # SES authorizes a send against the identity and the configuration set it uses.
        "Resource": [identity_arn, configuration_set_arn],
        "Condition": {"StringEquals": {"ses:FromAddress": sorted(from_addresses)}},
    })

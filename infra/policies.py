"""IAM policy documents as pure functions, so each permission can be read and tested on its own."""
from __future__ import annotations

import json


def document(*statements: dict) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)}, sort_keys=True)


def dns_challenge_policy(zone_arns: list[str]) -> str:
    """What Traefik's Route53 DNS-01 solver needs, and no more (never AmazonRoute53FullAccess)."""
    return document(
        {
            "Sid": "WriteAcmeChallengeTxtOnly",
            "Effect": "Allow",
            "Action": "route53:ChangeResourceRecordSets",
            "Resource": sorted(zone_arns),
            "Condition": {
                "ForAllValues:StringEquals": {"route53:ChangeResourceRecordSetsRecordTypes": ["TXT"]},
                "ForAllValues:StringLike": {
                    "route53:ChangeResourceRecordSetsNormalizedRecordNames": ["_acme-challenge.*"]
                },
            },
        },
        {"Sid": "ReadZones", "Effect": "Allow", "Action": "route53:ListResourceRecordSets",
         "Resource": sorted(zone_arns)},
        {"Sid": "WaitForPropagation", "Effect": "Allow", "Action": "route53:GetChange",
         "Resource": "arn:aws:route53:::change/*"},
        # This action supports no resource-level restriction.
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

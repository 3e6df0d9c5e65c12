"""SES in us-east-2: the katforge.com identity with Easy DKIM, a custom MAIL FROM domain, DMARC,
a configuration set, and the one IAM user allowed to send (whose SMTP credentials the api uses).

The identity, the configuration set and the user have account-unique names: a live one is imported
(`katforge:imports`), since creating it would collide. The rest takes over the live settings without
an import: DKIM and MAIL FROM are settings of the identity, which a create just sets (the provider
calls VerifyDomainDkim, then reads the identity's live tokens; SetIdentityMailFromDomain); the records
are UPSERTs; the user's inline policy gets a name of Pulumi's own, so it never meets a live one, and
becomes the user's only grant (infra/iam.py `sole_policy`).
"""
from __future__ import annotations

import pulumi
import pulumi_aws as aws

from infra import adopt
from infra.dns import Zones
from infra.iam import sole_policy
from infra.policies import ses_send_policy
from infra.settings import REGION, EmailSettings

DKIM_KEYS = 3  # Easy DKIM always publishes three CNAMEs
IDENTITY = "katforge.com"  # the SES identity (EmailSettings.domain)
CONFIGURATION_SET = "katforge"
SENDER = "ses-sender"  # the live IAM user's name
SMTP_ENDPOINT = f"email-smtp.{REGION}.amazonaws.com"
SMTP_PORT = 587


def dmarc_record(policy: str) -> str:
    return f"v=DMARC1; p={policy};"


class Email(pulumi.ComponentResource):
    def __init__(self, name: str, email: EmailSettings, zones: Zones,
                 permissions_boundary: pulumi.Input[str] | None = None, opts: pulumi.ResourceOptions | None = None):
        """`permissions_boundary`: the estate's boundary policy (infra/pipeline.py), the most the sender can do."""
        super().__init__("katforge:email:Email", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        domain = email.domain
        # Protected: a new identity must be verified again, and mail stops until it is.
        identity = aws.ses.DomainIdentity(
            domain, domain=domain,
            opts=pulumi.ResourceOptions(parent=self, protect=True, import_=adopt.import_id("DomainIdentity", domain)))
        zones.record(f"_amazonses.{domain}", "TXT", [identity.verification_token], self)

        dkim = aws.ses.DomainDkim(domain, domain=identity.domain, opts=child)
        for i in range(DKIM_KEYS):
            token = dkim.dkim_tokens[i]
            aws.route53.Record(f"dkim-{i}", zone_id=zones.ids[domain],
                               name=token.apply(lambda t: f"{t}._domainkey.{domain}"), type="CNAME", ttl=1800,
                               records=[token.apply(lambda t: f"{t}.dkim.amazonses.com")], allow_overwrite=True,
                               opts=child)

        mail_from = f"{email.mail_from_subdomain}.{domain}"
        # Until SES has seen the MX record below, RejectMessage would refuse every send; UseDefaultValue
        # sends from SES's own MAIL FROM domain meanwhile (the SES Developer Guide, "Using a custom MAIL
        # FROM domain"). The README says when to switch.
        aws.ses.MailFrom(domain, domain=identity.domain, mail_from_domain=mail_from,
                         behavior_on_mx_failure=email.mail_from_mx_failure, opts=child)
        zones.record(mail_from, "MX", [f"10 feedback-smtp.{REGION}.amazonses.com"], self)
        zones.record(mail_from, "TXT", ["v=spf1 include:amazonses.com -all"], self)
        zones.record(f"_dmarc.{domain}", "TXT", [dmarc_record(email.dmarc_policy)], self)

        configuration_set = aws.ses.ConfigurationSet(
            CONFIGURATION_SET, name=CONFIGURATION_SET,
            delivery_options=aws.ses.ConfigurationSetDeliveryOptionsArgs(tls_policy="Require"),
            reputation_metrics_enabled=True,
            opts=pulumi.ResourceOptions(parent=self, import_=adopt.import_id("ConfigurationSet", CONFIGURATION_SET)))

        sender = aws.iam.User(SENDER, name=SENDER, permissions_boundary=permissions_boundary,
                              opts=pulumi.ResourceOptions(parent=self, import_=adopt.import_id("User", SENDER)))
        policy = aws.iam.UserPolicy("ses-sender", user=sender.name,
                                    policy=pulumi.Output.all(identity.arn, configuration_set.arn).apply(
                                        lambda arns: ses_send_policy(arns[0], arns[1], list(email.from_addresses))),
                                    opts=child)
        sole_policy("ses-sender", sender, policy, self)
        key = aws.iam.AccessKey("ses-sender", user=sender.name, opts=pulumi.ResourceOptions(
            parent=self, additional_secret_outputs=["secret", "sesSmtpPasswordV4"]))
        self.smtp_username = pulumi.Output.secret(key.id)
        self.smtp_password = pulumi.Output.secret(key.ses_smtp_password_v4)
        self.configuration_set = configuration_set.name
        self.register_outputs({"identity": identity.domain, "configuration_set": configuration_set.name})

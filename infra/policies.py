"""IAM policy documents as pure functions, so each permission can be read and tested on its own."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass


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


# --- The CI roles' permissions (infra/pipeline.py) ------------------------------------------------
# What `pulumi up` may touch is the estate and nothing else: EC2 objects carrying the estate's tag,
# the records of the estate's domains, the SES identity, the estate's buckets and the state bucket,
# and IAM objects of the estate's names. Every user the deploy role creates and every role and user it
# grants to must carry the permissions boundary, and the boundary is the most any of them can ever do: it
# holds the deploy role's own grants plus what the estate's workloads need, and the same guards. So
# nothing the deploy role makes can do more than the estate needs, and it cannot lift the boundary or
# change itself. What could leak or plant a dump or widen another identity stays an operator's
# (guard_statements' OperatorsOnly).
ESTATE_TAG = ("Project", "katforge")  # on every instance, address, security group, rule and root volume
BOUNDARY_POLICY = "katforge-permissions-boundary"
DEPLOY_ROLE = "katforge-github-deploy"
BACKUP_WRITER_ROLE = "katforge-backup-writer"  # the k3s host's role (infra/backups.py): the dumps are its alone
CI_ROLES = "katforge-github-*"  # the preview and deploy roles
CI_LOCK_PREFIX = "katforge-ci-locks"  # WireGuard peer leases in the state bucket (tools/lock.py)
GITHUB_OIDC = "token.actions.githubusercontent.com"
UBUNTU_OWNER = "099720109477"  # Canonical: the only AMIs a host may boot (infra/hosts.py)
# SES's v1 management calls take no resource ARN (Service Authorization Reference, Amazon SES v1:
# VerifyDomainIdentity, SetIdentityMailFromDomain... have no resource types); they are held to the region.
SES_V1_SETTINGS = ("ses:VerifyDomainIdentity", "ses:VerifyDomainDkim", "ses:SetIdentityMailFromDomain",
                   "ses:GetIdentityVerificationAttributes", "ses:GetIdentityDkimAttributes",
                   "ses:GetIdentityMailFromDomainAttributes", "ses:DescribeConfigurationSet",
                   "ses:UpdateConfigurationSetReputationMetricsEnabled")


# The account part of every ARN: EC2, IAM and SES act only on the caller's own account's objects, so
# naming it adds nothing (and leaves the documents free of a value only a deployment knows).
ACCOUNT = "*"


@dataclass(frozen=True)
class EstateScope:
    """The names that bound every CI permission."""
    region: str
    domains: tuple[str, ...]  # the hosted zones' names: records only under these
    ses_identity: str
    ses_configuration_set: str
    buckets: tuple[str, ...]  # the estate's own buckets (backups)
    state_bucket: str  # the Pulumi DIY backend
    users: tuple[str, ...]  # the IAM users the program declares whose live names are not katforge-*
    name_prefix: str = "katforge-"  # roles, policies and instance profiles
    rds: bool = False  # the stack declares the RDS instance (a stage's database is not on the host)

    def ec2(self, kind: str, name: str = "*") -> str:
        return f"arn:aws:ec2:{self.region}:{ACCOUNT}:{kind}/{name}"

    def iam(self, kind: str, name: str) -> str:
        return f"arn:aws:iam::{ACCOUNT}:{kind}/{name}"

    @property
    def boundary_arn(self) -> str:
        return self.iam("policy", BOUNDARY_POLICY)

    @property
    def roles(self) -> str:
        return self.iam("role", self.name_prefix + "*")

    @property
    def user_arns(self) -> list[str]:
        """The estate's users: katforge-named ones, and the live ones named before that rule."""
        return [self.iam("user", self.name_prefix + "*"), *(self.iam("user", user) for user in self.users)]

    @property
    def ses_arns(self) -> list[str]:
        return [f"arn:aws:ses:{self.region}:{ACCOUNT}:identity/{self.ses_identity}",
                f"arn:aws:ses:{self.region}:{ACCOUNT}:configuration-set/{self.ses_configuration_set}"]


def _tagged(key: str) -> dict:
    return {"StringEquals": {f"aws:{key}/{ESTATE_TAG[0]}": ESTATE_TAG[1]}}


def _ec2_statements(scope: EstateScope) -> list[dict]:
    tagged_kinds = ("instance", "elastic-ip", "security-group", "security-group-rule", "volume")
    return [
        # Describe* has no resource-level permissions (Service Authorization Reference, Amazon EC2).
        {"Sid": "Ec2Read", "Effect": "Allow", "Action": "ec2:Describe*", "Resource": "*"},
        # A new instance, address, group or rule carries the estate's tag from its first moment.
        {"Sid": "Ec2CreateTagged", "Effect": "Allow",
         "Action": ["ec2:RunInstances", "ec2:AllocateAddress", "ec2:CreateSecurityGroup",
                    "ec2:AuthorizeSecurityGroupIngress", "ec2:AuthorizeSecurityGroupEgress"],
         "Resource": [scope.ec2(kind) for kind in ("instance", "elastic-ip", "security-group", "security-group-rule")],
         "Condition": _tagged("RequestTag")},
        {"Sid": "Ec2TagOnCreate", "Effect": "Allow", "Action": "ec2:CreateTags",
         "Resource": [scope.ec2(kind) for kind in tagged_kinds],
         "Condition": {"StringEquals": {"ec2:CreateAction": [
             "RunInstances", "AllocateAddress", "CreateSecurityGroup", "AuthorizeSecurityGroupIngress",
             "AuthorizeSecurityGroupEgress"]}}},
        # What a launch, a new group or an association also names: the subnet, the new network
        # interface and root volume, the VPC, the kept live groups (hosts' keep lists), the key pair.
        {"Sid": "Ec2LaunchInto", "Effect": "Allow",
         "Action": ["ec2:RunInstances", "ec2:CreateSecurityGroup", "ec2:ModifyInstanceAttribute",
                    "ec2:AssociateAddress", "ec2:DisassociateAddress"],
         "Resource": [scope.ec2(kind) for kind in ("subnet", "network-interface", "volume", "vpc", "security-group")]
         + [scope.ec2("key-pair", scope.name_prefix + "*")]},
        {"Sid": "Ec2UbuntuImagesOnly", "Effect": "Allow", "Action": "ec2:RunInstances",
         "Resource": f"arn:aws:ec2:{scope.region}::image/*",
         "Condition": {"StringEquals": {"ec2:Owner": UBUNTU_OWNER}}},
        {"Sid": "Ec2ManageTagged", "Effect": "Allow",
         "Action": ["ec2:ModifyInstanceAttribute", "ec2:ModifyInstanceMetadataOptions", "ec2:StartInstances",
                    "ec2:StopInstances", "ec2:AssociateAddress", "ec2:DisassociateAddress",
                    "ec2:AuthorizeSecurityGroupIngress", "ec2:AuthorizeSecurityGroupEgress",
                    "ec2:RevokeSecurityGroupIngress", "ec2:RevokeSecurityGroupEgress", "ec2:ModifySecurityGroupRules",
                    "ec2:UpdateSecurityGroupRuleDescriptionsIngress", "ec2:UpdateSecurityGroupRuleDescriptionsEgress",
                    "ec2:DeleteSecurityGroup", "ec2:ModifyVolume", "ec2:CreateTags", "ec2:DeleteTags"],
         "Resource": [scope.ec2(kind) for kind in tagged_kinds], "Condition": _tagged("ResourceTag")},
        {"Sid": "Ec2KeyPair", "Effect": "Allow", "Action": ["ec2:ImportKeyPair", "ec2:DeleteKeyPair"],
         "Resource": scope.ec2("key-pair", scope.name_prefix + "*")},
    ]


def _dns_statements(scope: EstateScope) -> list[dict]:
    names = sorted({name for domain in scope.domains for name in (domain, f"*.{domain}")})
    return [
        # Records only under the estate's domains, in whichever zone holds them (the zones are looked
        # up by the program, never created); reading a zone shows nothing secret.
        {"Sid": "DnsRecordsOfTheEstate", "Effect": "Allow", "Action": "route53:ChangeResourceRecordSets",
         "Resource": "arn:aws:route53:::hostedzone/*",
         "Condition": {"ForAllValues:StringLike": {"route53:ChangeResourceRecordSetsNormalizedRecordNames": names},
                       "Null": {"route53:ChangeResourceRecordSetsNormalizedRecordNames": "false"}}},
        {"Sid": "DnsRead", "Effect": "Allow",
         "Action": ["route53:GetHostedZone", "route53:ListResourceRecordSets", "route53:ListTagsForResource"],
         "Resource": "arn:aws:route53:::hostedzone/*"},
        {"Sid": "DnsChanges", "Effect": "Allow", "Action": "route53:GetChange", "Resource": "arn:aws:route53:::change/*"},
        {"Sid": "DnsFindZones", "Effect": "Allow", "Action": ["route53:ListHostedZones", "route53:ListHostedZonesByName"],
         "Resource": "*"},
    ]


def _ses_statements(scope: EstateScope) -> list[dict]:
    return [
        {"Sid": "SesIdentitySettings", "Effect": "Allow", "Action": list(SES_V1_SETTINGS), "Resource": "*",
         "Condition": {"StringEquals": {"aws:RequestedRegion": scope.region}}},
        {"Sid": "SesConfigurationSet", "Effect": "Allow",
         "Action": ["ses:CreateConfigurationSet", "ses:DeleteConfigurationSet", "ses:PutConfigurationSetDeliveryOptions"],
         "Resource": scope.ses_arns[1]},
    ]


def _s3_statements(scope: EstateScope) -> list[dict]:
    buckets = [f"arn:aws:s3:::{bucket}" for bucket in scope.buckets]
    state = f"arn:aws:s3:::{scope.state_bucket}"
    return [
        # The buckets' settings only (their ARNs name no object): never a dump. Not the policy, the public
        # access block nor the lifecycle rules (OperatorsOnly).
        {"Sid": "EstateBuckets", "Effect": "Allow",
         "Action": ["s3:CreateBucket", "s3:ListBucket", "s3:GetBucket*", "s3:GetAccelerateConfiguration",
                    "s3:GetLifecycleConfiguration", "s3:GetReplicationConfiguration", "s3:GetEncryptionConfiguration",
                    "s3:PutBucketVersioning", "s3:PutEncryptionConfiguration", "s3:PutBucketTagging"],
         "Resource": buckets},
        {"Sid": "StateBucket", "Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
         "Resource": state},
        # The DIY backend keeps stacks, history and locks under .pulumi/ (pulumi/pulumi pkg/backend/diy).
        {"Sid": "StateObjects", "Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
         "Resource": f"{state}/.pulumi/*"},
    ]


def _iam_statements(scope: EstateScope) -> list[dict]:
    roles, users = scope.roles, scope.user_arns
    policies = scope.iam("policy", scope.name_prefix + "*")
    profiles = scope.iam("instance-profile", scope.name_prefix + "*")
    provider = scope.iam("oidc-provider", GITHUB_OIDC)
    boundary = {"ArnLike": {"iam:PermissionsBoundary": scope.boundary_arn}}
    return [
        {"Sid": "IamRead", "Effect": "Allow", "Action": ["iam:Get*", "iam:List*"],
         "Resource": [roles, *users, policies, profiles, provider]},
        # Every grant to a role or user, and every user made, comes with the boundary (roles are made
        # by operators: OperatorsOnly).
        {"Sid": "IamGrantWithinBoundary", "Effect": "Allow",
         "Action": ["iam:CreateUser", "iam:PutRolePermissionsBoundary",
                    "iam:PutUserPermissionsBoundary", "iam:PutRolePolicy", "iam:PutUserPolicy",
                    "iam:DeleteRolePolicy", "iam:DeleteUserPolicy", "iam:DetachRolePolicy", "iam:DetachUserPolicy"],
         "Resource": [roles, *users], "Condition": boundary},
        # Managed policies: the preview's ReadOnlyAccess and the estate's own, never *FullAccess or
        # AdministratorAccess. Detaching stays open: taking a grant away never widens one.
        {"Sid": "IamAttachKnownPolicies", "Effect": "Allow", "Action": ["iam:AttachRolePolicy", "iam:AttachUserPolicy"],
         "Resource": [roles, *users],
         "Condition": {"ArnLike": {**boundary["ArnLike"], "iam:PolicyARN": ["arn:aws:iam::aws:policy/ReadOnlyAccess", policies]}}},
        {"Sid": "IamManage", "Effect": "Allow",
         "Action": ["iam:UpdateRole", "iam:UpdateRoleDescription", "iam:DeleteRole",
                    "iam:TagRole", "iam:UntagRole", "iam:TagUser", "iam:UntagUser", "iam:UpdateAccessKey",
                    "iam:DeleteAccessKey", "iam:CreatePolicy", "iam:DeletePolicy", "iam:TagPolicy", "iam:UntagPolicy",
                    "iam:CreateInstanceProfile", "iam:DeleteInstanceProfile",
                    "iam:RemoveRoleFromInstanceProfile", "iam:TagInstanceProfile", "iam:UntagInstanceProfile",
                    "iam:CreateOpenIDConnectProvider", "iam:AddClientIDToOpenIDConnectProvider",
                    "iam:RemoveClientIDFromOpenIDConnectProvider", "iam:UpdateOpenIDConnectProviderThumbprint",
                    "iam:TagOpenIDConnectProvider", "iam:UntagOpenIDConnectProvider"],
         "Resource": [roles, *users, policies, profiles, provider]},
    ]


def guard_statements(scope: EstateScope) -> list[dict]:
    """Denials that hold whatever else is granted: in the deploy role's policy and in the boundary."""
    dumps = [f"arn:aws:s3:::{bucket}/*" for bucket in scope.buckets]
    return [
        {"Sid": "KeepTheBoundary", "Effect": "Deny",
         "Action": ["iam:DeleteRolePermissionsBoundary", "iam:DeleteUserPermissionsBoundary"], "Resource": "*"},
        {"Sid": "BoundaryIsFixed", "Effect": "Deny", "Action": ["iam:DeletePolicy", "iam:TagPolicy", "iam:UntagPolicy"],
         "Resource": scope.boundary_arn},
        # The CI roles change only by an operator's hand: the deploy role could otherwise widen its own
        # grants, or the preview role's trust and grants, which pull requests use.
        {"Sid": "CiRolesAreFixed", "Effect": "Deny", "NotAction": ["iam:Get*", "iam:List*"],
         "Resource": scope.iam("role", CI_ROLES)},
        # No other identity's credentials: no role chaining (a trust policy naming this role would
        # otherwise suffice within the account) and no new access keys (operators rotate them).
        {"Sid": "NoOtherIdentities", "Effect": "Deny", "Action": ["sts:AssumeRole", "iam:CreateAccessKey"],
         "Resource": "*"},
        # An operator's `pulumi up` only (README, "Setting up CI"), for any bounded identity, as each could
        # otherwise leak or plant a dump or widen an identity the boundary does not hold:
        # - a bucket's policy, public access block and ACLs: a Principal "*" grant makes every dump public;
        # - who may become a role: a new role (it could take the backup writer's name and its dumps) or a
        #   changed trust policy (the writer's; a hand-made katforge-* role without the boundary);
        # - handing a role to an instance (RunInstances with an instance profile and its own user data,
        #   an association; each needs iam:PassRole) or to an instance profile;
        # - a managed policy's versions: operators, unbounded, attach katforge-backup-restore;
        # - what destroys data: terminating an instance or deleting a volume (the k3s host's holds
        #   PostgreSQL), a bucket's lifecycle rules (a one-day expiry deletes every dump). The deploy role
        #   writes the policies of every bounded user, whose keys are in the state it decrypts, so a denial
        #   in its own policy alone would not hold. Removing or replacing a k3s agent is an operator's too.
        {"Sid": "OperatorsOnly", "Effect": "Deny",
         "Action": ["s3:PutBucketPolicy", "s3:DeleteBucketPolicy", "s3:PutBucketPublicAccessBlock", "s3:Put*Acl",
                    "s3:PutBucketOwnershipControls", "iam:CreateRole", "iam:UpdateAssumeRolePolicy", "iam:PassRole",
                    "iam:AddRoleToInstanceProfile", "ec2:AssociateIamInstanceProfile",
                    "ec2:ReplaceIamInstanceProfileAssociation", "iam:CreatePolicyVersion",
                    "iam:DeletePolicyVersion", "iam:SetDefaultPolicyVersion", "ec2:TerminateInstances",
                    "ec2:DeleteVolume", "s3:PutLifecycleConfiguration"],
         "Resource": "*"},
        # The dumps are the backup writer's alone: the k3s host adds them and reads them back (the HEAD
        # after a lost upload answer, the drill, `sudo katforge-restore`); operators restore with a policy
        # of their own and no boundary. The exemption names the role: for a role's session
        # aws:PrincipalArn is the role's ARN (IAM User Guide, "AWS global condition context keys"), and
        # no bounded identity can become that role: only an operator creates roles, changes trust
        # policies or passes a role to an instance (OperatorsOnly). The denial sits in the boundary, not
        # only in the CI roles' policies, because the deploy role writes the policies of every bounded
        # user and role (an access key of one is in the state it decrypts); it holds whatever a bucket
        # policy grants.
        {"Sid": "NoDatabaseDumps", "Effect": "Deny", "Action": ["s3:GetObject", "s3:PutObject"], "Resource": dumps,
         "Condition": {"ArnNotLike": {"aws:PrincipalArn": scope.iam("role", BACKUP_WRITER_ROLE)}}},
        # No one deletes a dump or reads an overwritten one, the writer included.
        {"Sid": "DumpsStay", "Effect": "Deny",
         "Action": ["s3:GetObjectVersion", "s3:DeleteObject", "s3:DeleteObjectVersion"], "Resource": dumps},
    ]


def workload_statements(scope: EstateScope) -> list[dict]:
    """What the estate's own identities need beyond the deploy role's grants (the boundary holds them)."""
    return [
        {"Sid": "SendAsTheIdentity", "Effect": "Allow", "Action": ["ses:SendEmail", "ses:SendRawEmail"],
         "Resource": scope.ses_arns},
        # The backup writer's (guard_statements' NoDatabaseDumps keeps every other identity out).
        {"Sid": "TheWritersDumps", "Effect": "Allow", "Action": ["s3:PutObject", "s3:GetObject"],
         "Resource": [f"arn:aws:s3:::{bucket}/*" for bucket in scope.buckets]},
        {"Sid": "PreviewPeerLocks", "Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
         "Resource": f"arn:aws:s3:::{scope.state_bucket}/{CI_LOCK_PREFIX}/*"},
    ]


# Reading only, so that CI's refresh and preview work once the stack declares RDS; making or changing the
# instance, its parameter and subnet groups is an operator's `pulumi up` (README, "Moving a database to
# RDS"): the instance holds the data, and its master password travels in the request. Without RDS, nothing.
RDS_READ = ("rds:Describe*", "rds:ListTagsForResource")


def _rds_statements(scope: EstateScope) -> list[dict]:
    return [{"Sid": "RdsRead", "Effect": "Allow", "Action": list(RDS_READ), "Resource": "*"}] if scope.rds else []


def deploy_statements(scope: EstateScope) -> list[dict]:
    return [*_ec2_statements(scope), *_dns_statements(scope), *_ses_statements(scope), *_s3_statements(scope),
            *_iam_statements(scope), *_rds_statements(scope)]


def deploy_policy(scope: EstateScope) -> str:
    """Everything `pulumi up` does to the estate, and only to the estate: never a dump (a planted one would
    be restored)."""
    return document(*deploy_statements(scope), *guard_statements(scope))


def boundary_policy(scope: EstateScope) -> str:
    """The permissions boundary of every estate role and user: what the deploy role may do and what the
    workloads need, with coarser actions (a managed policy holds 6,144 characters) but the same
    resources, the same conditions on grants and the same guards. tests/test_deploy_role.py checks
    that it allows everything the deploy role's policy does."""
    deploy = {statement["Sid"]: statement for statement in deploy_statements(scope)}
    tagged = deploy["Ec2ManageTagged"]["Resource"]
    iam = deploy["IamManage"]["Resource"]
    statements = (
        # Reading configuration (no data): EC2, Route 53, IAM, and RDS when the stack declares it.
        {"Sid": "Read", "Effect": "Allow",
         "Action": ["ec2:Describe*", "route53:Get*", "route53:List*", "iam:Get*", "iam:List*",
                    *(("rds:Describe*", "rds:List*") if scope.rds else ())], "Resource": "*"},
        deploy["Ec2CreateTagged"], deploy["Ec2TagOnCreate"], deploy["Ec2LaunchInto"],
        deploy["Ec2UbuntuImagesOnly"],
        {"Sid": "Ec2Estate", "Effect": "Allow", "Action": "ec2:*", "Resource": tagged,
         "Condition": _tagged("ResourceTag")},
        {**deploy["Ec2KeyPair"], "Action": "ec2:*"},
        deploy["DnsRecordsOfTheEstate"],
        {**deploy["SesIdentitySettings"], "Action": ["ses:Get*", "ses:Verify*", "ses:Set*", "ses:Describe*",
                                                     "ses:Update*"]},
        {"Sid": "SesEstate", "Effect": "Allow", "Action": "ses:*", "Resource": scope.ses_arns},
        {"Sid": "EstateBuckets", "Effect": "Allow", "Action": "s3:*", "Resource": deploy["EstateBuckets"]["Resource"]},
        # The state bucket: the backend's objects and the preview's peer leases.
        {"Sid": "State", "Effect": "Allow", "Action": [*deploy["StateBucket"]["Action"], *deploy["StateObjects"]["Action"]],
         "Resource": [deploy["StateBucket"]["Resource"], deploy["StateObjects"]["Resource"],
                      workload_statements(scope)[2]["Resource"]]},
        workload_statements(scope)[1],
        deploy["IamGrantWithinBoundary"], deploy["IamAttachKnownPolicies"],
        {"Sid": "IamManage", "Effect": "Allow",
         "Action": ["iam:Update*", "iam:Tag*", "iam:Untag*", "iam:Delete*", "iam:CreatePolicy*",
                    "iam:*InstanceProfile*", "iam:*OpenIDConnectProvider*"],
         "Resource": iam},
        *guard_statements(scope),
    )
    # Without statement IDs: the limit leaves no room for them (the Sids above name each in this code).
    return document(*({k: v for k, v in statement.items() if k != "Sid"} for statement in statements))


def preview_policy(scope: EstateScope) -> str:
    """The preview role's inline policy beside ReadOnlyAccess (which the boundary narrows to the estate's
    configuration, never a dump): the leases on its WireGuard peers (tools/lock.py)."""
    return document(workload_statements(scope)[2])


def backup_alert_policy(identity_arn: str, from_address: str, to_addresses: list[str]) -> str:
    """The k3s host's alerts through SES's SMTP interface (which authorizes ses:SendRawEmail): from the one
    backup address, to the ops addresses only. ses:Recipients holds every To, Cc and Bcc address; with
    ForAllValues each of them must be listed (Amazon SES Developer Guide, "Controlling access to Amazon SES")."""
    return document({
        "Sid": "MailOpsFromTheBackupAddress",
        "Effect": "Allow",
        "Action": "ses:SendRawEmail",
        "Resource": identity_arn,
        "Condition": {
            "StringEquals": {"ses:FromAddress": from_address},
            "ForAllValues:StringEquals": {"ses:Recipients": sorted(to_addresses)},
        },
    })

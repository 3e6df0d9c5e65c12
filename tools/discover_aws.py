"""The AWS half of `make discover`: read-only calls with the operator's own credentials (boto3's usual
chain: environment, profile, SSO), in the program's region. boto3 honours AWS_ENDPOINT_URL (the pinned
botocore reads it in botocore/configprovider.py, with AWS_ENDPOINT_URL_<SERVICE> and the profile's
endpoint_url), so the same code reads any AWS-API-compatible endpoint: the tests reach moto that way.

Every object found carries `import`: the Pulumi type token and the ID `pulumi import` expects for it.
A name the program declares that does not exist live is `{"exists": false}`. A call the credentials
may not make is recorded as `{"error": ...}` at that fact, and the rest is still read.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import boto3
from botocore.exceptions import ClientError

from tools.discover_targets import Targets

# Error codes that mean "there is no such thing" for the calls below.
ABSENT = {"NoSuchEntity", "NoSuchBucket", "NotFound", "404", "InvalidKeyPair.NotFound",
          "ConfigurationSetDoesNotExist", "NoSuchHostedZone", "NoSuchPublicAccessBlockConfiguration",
          "ServerSideEncryptionConfigurationNotFoundError", "InvalidInstanceID.NotFound"}


def imported(type_: str, id_: str) -> dict:
    return {"type": type_, "id": id_}


def error_of(error: ClientError) -> str:
    info = error.response.get("Error", {})
    return f"{info.get('Code', 'Error')}: {info.get('Message', '')}".strip()


def read(call: Callable[[], dict], absent: Optional[Callable[[], dict]] = None) -> dict:
    """The facts `call` returns; `{"exists": false}` (or `absent()`) when AWS says the thing is not there;
    `{"error": ...}` for any other refusal, so one denied call costs one fact, not the whole run."""
    try:
        return call()
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ABSENT:
            return absent() if absent else {"exists": False}
        return {"error": error_of(error)}


class Aws:
    def __init__(self, targets: Targets, session: Optional[boto3.session.Session] = None):
        self.t = targets
        self.session = session or boto3.session.Session(region_name=targets.region)
        self._clients: dict[str, Any] = {}

    def client(self, service: str):
        if service not in self._clients:
            self._clients[service] = self.session.client(service, region_name=self.t.region)
        return self._clients[service]

    def pages(self, service: str, operation: str, key: str, **kwargs) -> list:
        paginator = self.client(service).get_paginator(operation)
        return [item for page in paginator.paginate(**kwargs) for item in page.get(key, [])]

    # --- the whole account -------------------------------------------------------------------

    def discover(self) -> dict:
        identity = self.client("sts").get_caller_identity()
        self.account = identity["Account"]
        ses = self.ses()
        facts = {
            "region": self.t.region,
            "account": self.account,
            "instances": {role: self.instance(role) for role in self.t.instances},
            "iam": {
                "users": {name: read(lambda n=name: self.user(n)) for name in self.t.iam_users},
                "roles": {name: read(lambda n=name: self.role(n)) for name in self.t.iam_roles},
                "instanceProfiles": {name: read(lambda n=name: self.instance_profile(n))
                                     for name in self.t.instance_profiles},
                "policies": {name: read(lambda n=name: self.policy(n)) for name in self.t.iam_policies},
                "oidcProviders": {url: read(lambda u=url: self.oidc_provider(u)) for url in self.t.oidc_urls},
            },
            "keyPairs": {name: read(lambda n=name: self.key_pair(n)) for name in self.t.key_pairs},
            "buckets": {name: self.bucket(name) for name in self.t.buckets},
            "ses": ses,
        }
        facts["route53"] = self.route53(ses)
        return facts

    # --- EC2 ---------------------------------------------------------------------------------

    def instance(self, role: str) -> dict:
        """The k3s host by its private address, the VPN host by its Elastic IP (both from config)."""
        ec2 = self.client("ec2")
        if role == "k3s":
            lookup = {"by": "private-ip-address", "value": self.t.k3s_private_ip}
            found = self.pages("ec2", "describe_instances", "Reservations",
                               Filters=[{"Name": "private-ip-address", "Values": [lookup["value"]]}])
        else:
            lookup = {"by": "elastic-ip", "value": self.t.vpn_public_ip}
            addresses = read(lambda: {"Addresses": ec2.describe_addresses(
                Filters=[{"Name": "public-ip", "Values": [lookup["value"]]}])["Addresses"]})
            if "error" in addresses:
                return {"lookup": lookup, **addresses}
            ids = [a["InstanceId"] for a in addresses["Addresses"] if a.get("InstanceId")]
            if ids:
                found = self.pages("ec2", "describe_instances", "Reservations", InstanceIds=ids)
            else:  # the address is no Elastic IP of this account: maybe the instance's own public one
                lookup["by"] = "public-ip-address"
                found = self.pages("ec2", "describe_instances", "Reservations",
                                   Filters=[{"Name": "ip-address", "Values": [lookup["value"]]}])
        instances = [i for reservation in found for i in reservation["Instances"]
                     if i["State"]["Name"] != "terminated"]
        if not instances:
            return {"exists": False, "lookup": lookup}
        if len(instances) > 1:
            return {"lookup": lookup, "error": "more than one instance matches: "
                    + ", ".join(sorted(i["InstanceId"] for i in instances))}
        return {"exists": True, "lookup": lookup, **self.instance_facts(instances[0])}

    def instance_facts(self, i: dict) -> dict:
        ec2 = self.client("ec2")
        instance_id = i["InstanceId"]
        subnet = ec2.describe_subnets(SubnetIds=[i["SubnetId"]])["Subnets"][0]
        protection = read(lambda: {"value": ec2.describe_instance_attribute(
            InstanceId=instance_id, Attribute="disableApiTermination")["DisableApiTermination"]["Value"]})
        profile = i.get("IamInstanceProfile", {}).get("Arn")
        metadata = i.get("MetadataOptions", {})
        return {
            "import": imported("aws:ec2/instance:Instance", instance_id),
            "state": i["State"]["Name"],
            "instanceType": i["InstanceType"],
            "imageId": i.get("ImageId"),
            "keyName": i.get("KeyName"),
            "privateIp": i.get("PrivateIpAddress"),
            "publicIp": i.get("PublicIpAddress"),
            "vpcId": i.get("VpcId"),
            "subnet": {"id": subnet["SubnetId"], "cidr": subnet["CidrBlock"],
                       "availabilityZone": subnet["AvailabilityZone"]},
            "rootVolume": self.root_volume(i),
            "securityGroups": {g["GroupId"]: self.security_group(g["GroupId"]) for g in i.get("SecurityGroups", [])},
            "instanceProfile": {"arn": profile, "name": profile.rsplit("/", 1)[1]} if profile else None,
            "metadataOptions": {"httpEndpoint": metadata.get("HttpEndpoint"), "httpTokens": metadata.get("HttpTokens"),
                                "httpPutResponseHopLimit": metadata.get("HttpPutResponseHopLimit")},
            "sourceDestCheck": i.get("SourceDestCheck"),
            "disableApiTermination": protection.get("value", protection),
            "tags": {t["Key"]: t["Value"] for t in i.get("Tags", [])},
            "elasticIp": self.elastic_ip(instance_id),
        }

    def root_volume(self, i: dict) -> Optional[dict]:
        mapping = next((m for m in i.get("BlockDeviceMappings", []) if m["DeviceName"] == i.get("RootDeviceName")), None)
        if mapping is None or "Ebs" not in mapping:
            return None
        volume = self.client("ec2").describe_volumes(VolumeIds=[mapping["Ebs"]["VolumeId"]])["Volumes"][0]
        return {"volumeId": volume["VolumeId"], "device": mapping["DeviceName"], "sizeGb": volume["Size"],
                "type": volume["VolumeType"], "encrypted": volume["Encrypted"],
                "kmsKeyId": volume.get("KmsKeyId"), "iops": volume.get("Iops"),
                "throughput": volume.get("Throughput"),
                "deleteOnTermination": mapping["Ebs"].get("DeleteOnTermination")}

    def elastic_ip(self, instance_id: str) -> dict:
        addresses = self.client("ec2").describe_addresses(
            Filters=[{"Name": "instance-id", "Values": [instance_id]}])["Addresses"]
        if not addresses:
            return {"exists": False}
        a = addresses[0]
        return {"exists": True, "import": imported("aws:ec2/eip:Eip", a["AllocationId"]), "publicIp": a["PublicIp"],
                "domain": a.get("Domain"),
                "association": {"exists": True, "import": imported("aws:ec2/eipAssociation:EipAssociation",
                                                                   a["AssociationId"])}}

    def security_group(self, group_id: str) -> dict:
        ec2 = self.client("ec2")
        group = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
        rules = self.pages("ec2", "describe_security_group_rules", "SecurityGroupRules",
                           Filters=[{"Name": "group-id", "Values": [group_id]}])
        shown = [self.rule(r) for r in rules]
        return {"import": imported("aws:ec2/securityGroup:SecurityGroup", group_id), "name": group["GroupName"],
                "description": group.get("Description"), "vpcId": group.get("VpcId"),
                "ingress": sorted((r for r, raw in zip(shown, rules) if not raw["IsEgress"]), key=rule_order),
                "egress": sorted((r for r, raw in zip(shown, rules) if raw["IsEgress"]), key=rule_order)}

    @staticmethod
    def rule(r: dict) -> dict:
        source = {key: r[field] for key, field in (("cidrIpv4", "CidrIpv4"), ("cidrIpv6", "CidrIpv6"),
                                                  ("prefixListId", "PrefixListId")) if r.get(field)}
        if r.get("ReferencedGroupInfo"):
            source["securityGroupId"] = r["ReferencedGroupInfo"]["GroupId"]
        token = "SecurityGroupEgressRule" if r["IsEgress"] else "SecurityGroupIngressRule"
        return {"import": imported(f"aws:vpc/{token[0].lower()}{token[1:]}:{token}", r["SecurityGroupRuleId"]),
                "protocol": r["IpProtocol"], "fromPort": r.get("FromPort"), "toPort": r.get("ToPort"),
                "description": r.get("Description"), **source}

    def key_pair(self, name: str) -> dict:
        # The public key (public, as its name says) is what an import reads into the state, and what
        # preflight compares with sshPublicKey: a pair that seeds new instances with another key.
        pair = self.client("ec2").describe_key_pairs(KeyNames=[name], IncludePublicKey=True)["KeyPairs"][0]
        return {"exists": True, "import": imported("aws:ec2/keyPair:KeyPair", name),
                "keyPairId": pair.get("KeyPairId"), "keyType": pair.get("KeyType"),
                "fingerprint": pair.get("KeyFingerprint"), "publicKey": pair.get("PublicKey")}

    # --- IAM ---------------------------------------------------------------------------------

    def _policies(self, kind: str, name: str) -> dict:
        """Inline and attached policies of a user or role, each with its own import ID."""
        arg = {"UserName": name} if kind == "user" else {"RoleName": name}
        inline = self.pages("iam", f"list_{kind}_policies", "PolicyNames", **arg)
        attached = self.pages("iam", f"list_attached_{kind}_policies", "AttachedPolicies", **arg)
        Kind = kind.capitalize()
        return {
            "inlinePolicies": {p: {"import": imported(f"aws:iam/{kind}Policy:{Kind}Policy", f"{name}:{p}")}
                               for p in inline},
            "attachedPolicies": {p["PolicyArn"]: {"import": imported(
                f"aws:iam/{kind}PolicyAttachment:{Kind}PolicyAttachment", f"{name}/{p['PolicyArn']}")}
                for p in attached},
        }

    def user(self, name: str) -> dict:
        user = self.client("iam").get_user(UserName=name)["User"]
        keys = self.client("iam").list_access_keys(UserName=name)["AccessKeyMetadata"]
        # The key IDs are left out: the SES SMTP user name is one, and the program keeps them secret.
        return {"exists": True, "import": imported("aws:iam/user:User", name), "arn": user["Arn"],
                "path": user.get("Path"), "accessKeys": len(keys),
                "accessKeyStatuses": sorted(k["Status"] for k in keys), **self._policies("user", name)}

    def role(self, name: str) -> dict:
        role = self.client("iam").get_role(RoleName=name)["Role"]
        return {"exists": True, "import": imported("aws:iam/role:Role", name), "arn": role["Arn"],
                **self._policies("role", name)}

    def instance_profile(self, name: str) -> dict:
        profile = self.client("iam").get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        return {"exists": True, "import": imported("aws:iam/instanceProfile:InstanceProfile", name),
                "arn": profile["Arn"], "roles": sorted(r["RoleName"] for r in profile.get("Roles", []))}

    def policy(self, name: str) -> dict:
        arn = f"arn:aws:iam::{self.account}:policy/{name}"
        policy = self.client("iam").get_policy(PolicyArn=arn)["Policy"]
        return {"exists": True, "import": imported("aws:iam/policy:Policy", arn),
                "attachments": policy.get("AttachmentCount")}

    def oidc_provider(self, url: str) -> dict:
        iam = self.client("iam")
        for entry in iam.list_open_id_connect_providers()["OpenIDConnectProviderList"]:
            provider = iam.get_open_id_connect_provider(OpenIDConnectProviderArn=entry["Arn"])
            if provider["Url"].removeprefix("https://") == url:
                return {"exists": True, "import": imported("aws:iam/openIdConnectProvider:OpenIdConnectProvider",
                                                           entry["Arn"]),
                        "clientIds": sorted(provider.get("ClientIDList", [])),
                        "thumbprints": sorted(provider.get("ThumbprintList", []))}
        return {"exists": False}

    # --- S3 ----------------------------------------------------------------------------------

    def bucket(self, name: str) -> dict:
        """A bucket name is global: 403 means someone else's bucket holds it, a collision on create."""
        s3 = self.client("s3")
        try:
            s3.head_bucket(Bucket=name)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code")
            if code in ("404", "NoSuchBucket", "NotFound"):
                return {"exists": False}
            if code in ("403", "AccessDenied", "Forbidden"):
                return {"exists": True, "ours": False, "error": "another account holds this bucket name, or "
                        "these credentials may not read it (403)"}
            return {"error": error_of(error)}
        location = s3.get_bucket_location(Bucket=name).get("LocationConstraint") or "us-east-1"
        versioning = read(lambda: {"status": s3.get_bucket_versioning(Bucket=name).get("Status", "Disabled")})
        encryption = read(lambda: {"rules": [r["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] for r in
                                             s3.get_bucket_encryption(Bucket=name)["ServerSideEncryptionConfiguration"]["Rules"]]},
                          absent=lambda: {"rules": []})
        public = read(lambda: s3.get_public_access_block(Bucket=name)["PublicAccessBlockConfiguration"],
                      absent=lambda: {})
        return {"exists": True, "ours": True, "import": imported("aws:s3/bucket:Bucket", name), "region": location,
                "versioning": versioning.get("status", versioning), "encryption": encryption.get("rules", encryption),
                "publicAccessBlock": public}

    # --- SES ---------------------------------------------------------------------------------

    def ses(self) -> dict:
        ses = self.client("ses")
        domains = list(self.t.ses_domains)
        identities: dict[str, dict] = {}
        if domains:
            verification = ses.get_identity_verification_attributes(Identities=domains)["VerificationAttributes"]
            dkim = ses.get_identity_dkim_attributes(Identities=domains)["DkimAttributes"]
            mail_from = ses.get_identity_mail_from_domain_attributes(Identities=domains)["MailFromDomainAttributes"]
            for domain in domains:
                if domain not in verification:
                    identities[domain] = {"exists": False}
                    continue
                d, m = dkim.get(domain, {}), mail_from.get(domain, {})
                identities[domain] = {
                    "exists": True,
                    "import": imported("aws:ses/domainIdentity:DomainIdentity", domain),
                    "verification": verification[domain].get("VerificationStatus"),
                    # Public: SES publishes it as the _amazonses TXT record.
                    "verificationToken": verification[domain].get("VerificationToken"),
                    "dkim": {"import": imported("aws:ses/domainDkim:DomainDkim", domain),
                             "enabled": d.get("DkimEnabled"), "status": d.get("DkimVerificationStatus"),
                             "tokens": sorted(d.get("DkimTokens", []))},
                    "mailFrom": ({"exists": True, "import": imported("aws:ses/mailFrom:MailFrom", domain),
                                  "domain": m["MailFromDomain"], "status": m.get("MailFromDomainStatus"),
                                  "behaviorOnMxFailure": m.get("BehaviorOnMXFailure")}
                                 if m.get("MailFromDomain") else {"exists": False}),
                }
        return {"identities": identities,
                "configurationSets": {name: read(lambda n=name: self.configuration_set(n))
                                      for name in self.t.configuration_sets}}

    def configuration_set(self, name: str) -> dict:
        found = self.client("ses").describe_configuration_set(
            ConfigurationSetName=name, ConfigurationSetAttributeNames=["deliveryOptions", "reputationOptions"])
        return {"exists": True, "import": imported("aws:ses/configurationSet:ConfigurationSet", name),
                "tlsPolicy": found.get("DeliveryOptions", {}).get("TlsPolicy"),
                "reputationMetricsEnabled": found.get("ReputationOptions", {}).get("ReputationMetricsEnabled")}

    # --- Route53 -----------------------------------------------------------------------------

    def route53(self, ses: dict) -> dict:
        """The hosted zones by name, and every record at a name the program manages: the DNS table's,
        SES's, and each DKIM record of the domain (its names come from the live identity's tokens)."""
        zones = {}
        for name in self.t.zones:
            found = [z for z in self.pages("route53", "list_hosted_zones", "HostedZones")
                     if z["Name"].rstrip(".") == name and not z.get("Config", {}).get("PrivateZone")]
            zones[name] = ({"exists": True, "id": found[0]["Id"].rsplit("/", 1)[1]} if len(found) == 1 else
                           {"exists": False} if not found else
                           {"error": "more than one public zone of this name: "
                            + ", ".join(sorted(z["Id"].rsplit("/", 1)[1] for z in found))})
        managed = {name for name, _ in self.t.records if "._domainkey." not in name}
        dkim_domains = {name.split("._domainkey.", 1)[1] for name, _ in self.t.records if "._domainkey." in name}
        records = []
        for zone, info in sorted(zones.items()):
            if not info.get("exists"):
                continue
            for r in self.pages("route53", "list_resource_record_sets", "ResourceRecordSets", HostedZoneId=info["id"]):
                name = r["Name"].rstrip(".").lower().replace("\\052", "*")
                if name == zone and r["Type"] in ("NS", "SOA"):
                    continue  # the zone's own, never the program's
                dkim = any(name.endswith(f"._domainkey.{d}") for d in dkim_domains)
                if name in managed or dkim:
                    records.append(self.record(info["id"], zone, name, r, ses))
        return {"zones": zones, "records": sorted(records, key=lambda r: (r["name"], r["type"], r.get("setIdentifier") or ""))}

    @staticmethod
    def record(zone_id: str, zone: str, name: str, r: dict, ses: dict) -> dict:
        # pulumi-aws imports a record as ZONEID_name_TYPE, plus _SETIDENTIFIER for a routing policy's.
        import_id = "_".join([zone_id, name, r["Type"]] + ([r["SetIdentifier"]] if r.get("SetIdentifier") else []))
        record = {"name": name, "zone": zone, "type": r["Type"], "ttl": r.get("TTL"),
                  "values": [v["Value"] for v in r.get("ResourceRecords", [])],
                  "import": imported("aws:route53/record:Record", import_id)}
        if r.get("AliasTarget"):
            record["alias"] = {"name": r["AliasTarget"]["DNSName"].rstrip("."),
                               "zoneId": r["AliasTarget"]["HostedZoneId"]}
        if r.get("SetIdentifier"):
            record["setIdentifier"] = r["SetIdentifier"]
        if "._domainkey." in name:
            tokens = {t for i in ses["identities"].values() for t in (i.get("dkim") or {}).get("tokens", [])}
            record["currentDkimToken"] = name.split("._domainkey.", 1)[0] in tokens
        return record


def rule_order(rule: dict) -> tuple:
    return (rule["protocol"], rule["fromPort"] or 0, rule["toPort"] or 0,
            *(str(rule.get(k) or "") for k in ("cidrIpv4", "cidrIpv6", "prefixListId", "securityGroupId")))


def discover(targets: Targets, session: Optional[boto3.session.Session] = None) -> dict:
    return Aws(targets, session).discover()

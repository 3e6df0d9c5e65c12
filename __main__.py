"""The Katforge estate: one stack per stage. prod owns the hosts and everything shared; qa owns only
what belongs to qa and reads the rest from prod through a StackReference."""
from typing import NamedTuple, Optional

import pulumi

from infra import adopt, capacity, dns
from infra.addresses import Addresses
from infra.apps import PostgresEndpoint, StageWorkloads, routed_hosts
from infra.backups import BackupAlerts, BackupSchedule, BackupStorage
from infra.bootstrap import (AgentBootstrap, HostBootstrap, KubernetesProviders, StageDatabase, Target, host_target,
                             kubernetes_providers)
from infra.cluster import Cluster
from infra.database import HostPostgresStopped, RdsPostgres, RdsStageDatabase, rds_endpoint
from infra.dns import Dns
from infra.email import Email
from infra.hosts import Hosts
from infra.iam import DnsChallengeUser
from infra.network import Network
from infra.pipeline import Pipeline
from infra.settings import REGION, STAGES, Settings, load


class StageBase(NamedTuple):
    """What a stage's workloads stand on, and the stack's outputs."""
    records: Dns
    databases: list[pulumi.Resource]  # the stage's role and database, on the host (and on RDS)
    postgres: Optional[PostgresEndpoint]  # where the apps' DATABASE_URL points; None: the k3s host
    host: Target  # the k3s host
    providers: KubernetesProviders
    smtp_username: pulumi.Output
    smtp_password: pulumi.Output
    vpn_private_ip: pulumi.Output  # what VPN clients come from: the VPN host masquerades them
    exports: dict


def prod_estate(settings: Settings) -> StageBase:
    """The hosts, DNS, mail, IAM, bootstrap, backups, cluster-wide objects and the CI roles."""
    # The permissions boundary every role and user of the estate carries, so first.
    pipeline = Pipeline("pipeline", settings.pipeline, settings.backups.bucket, rds=settings.database.rds is not None)
    # The addresses before the network: the k3s host's rules trust the VPN's real address.
    addresses = Addresses("addresses", settings.hosts)
    agents = settings.hosts.k3s_agents
    network = Network("network", settings.network, addresses.vpn.public_ip, settings.hosts.vpn_subnet_id,
                      agent_ips=[agent.private_ip for agent in agents], rds=settings.database.rds is not None)
    backups = BackupStorage("backups", settings.backups, STAGES.values(), permissions_boundary=pipeline.boundary_arn)
    hosts = Hosts("hosts", settings.hosts, settings.network.k3s_private_ip, network, addresses,
                  instance_profile=backups.instance_profile_name)
    records = Dns("dns", settings.stage, settings.zone_ids,
                  {dns.K3S_PUBLIC: hosts.k3s.public_ip, dns.VPN_PUBLIC: hosts.vpn.public_ip})
    email = Email("email", settings.email, records.zones, permissions_boundary=pipeline.boundary_arn)
    dns_challenge = DnsChallengeUser("dns-challenge", records.zones.arns, routed_hosts(),
                                     permissions_boundary=pipeline.boundary_arn)
    bootstrap = HostBootstrap("bootstrap", settings.bootstrap, settings.network, settings.stage, hosts.k3s, hosts.vpn)
    if agents:
        AgentBootstrap("agents", settings.bootstrap, settings.network, settings.stage, bootstrap, hosts.k3s,
                       [(agent, hosts.agents[agent.name]) for agent in agents])
    database = StageDatabase("database", settings.stage_facts, settings.db_password, bootstrap.k3s_target,
                             bootstrap.postgres)
    databases: list[pulumi.Resource] = [database]
    exports = {}
    postgres = None
    if settings.database.rds:
        rds = RdsPostgres("rds", settings.database.rds, network.vpc_id, network.rds_sg, bootstrap.k3s_target,
                          after=[bootstrap.postgres])
        databases.append(RdsStageDatabase("database-rds", settings.stage_facts, settings.db_password,
                                          bootstrap.k3s_target, rds.address, after=rds.files))
        exports["rdsAddress"] = rds.address
        postgres = rds_endpoint(rds.address, settings.network.vpc_cidr) if settings.database.on_rds else \
            PostgresEndpoint.migrating(settings.network.k3s_private_ip, settings.network.vpc_cidr)
    alerts = BackupAlerts("backup-alerts", settings.backups, settings.email.domain,
                          permissions_boundary=pipeline.boundary_arn)
    BackupSchedule("backup-schedule", settings.backups, STAGES.values(), backups, alerts, bootstrap.k3s_target,
                   bootstrap.postgres)
    k3s = kubernetes_providers(bootstrap.kubeconfig, hosts.k3s.instance.id)
    cluster = Cluster("cluster", acme_email=settings.cluster.acme_email, aws_region=REGION,
                      node_ip=settings.network.k3s_private_ip, access_key_id=dns_challenge.access_key_id,
                      secret_access_key=dns_challenge.secret_access_key, provider=k3s.objects,
                      on_server_only=bool(agents))
    return StageBase(
        records=records, databases=databases, postgres=postgres, host=bootstrap.k3s_target, providers=k3s,
        smtp_username=email.smtp_username, smtp_password=email.smtp_password,
        vpn_private_ip=hosts.vpn.instance.private_ip,
        exports={
            "k3sPublicIp": hosts.k3s.public_ip, "k3sPrivateIp": settings.network.k3s_private_ip,
            "k3sInstanceId": hosts.k3s.instance.id, "vpnPublicIp": hosts.vpn.public_ip,
            "vpnPrivateIp": hosts.vpn.instance.private_ip,
            "vpnPublicKey": bootstrap.vpn_public_key, "zoneIds": records.zones.ids,
            "kubeconfig": bootstrap.kubeconfig, "ciKubeconfig": cluster.ci_kubeconfig,
            "sesSmtpUsername": email.smtp_username, "sesSmtpPassword": email.smtp_password,
            "dnsChallengeAccessKeyId": dns_challenge.access_key_id,
            "dnsChallengeSecretAccessKey": dns_challenge.secret_access_key,
            "backupBucket": backups.bucket_name, "backupRestorePolicyArn": backups.restore_policy_arn,
            "previewRoleArn": pipeline.preview_role_arn, "deployRoleArn": pipeline.deploy_role_arn,
            **exports,
        },
    )


def qa_estate(settings: Settings) -> StageBase:
    """qa's DNS names and database; the host, kubeconfig and mail credentials come from prod."""
    prod = pulumi.StackReference("prod", stack_name=settings.prod_stack)
    records = Dns("dns", settings.stage, settings.zone_ids, {dns.K3S_PRIVATE: prod.require_output("k3sPrivateIp")})
    host = host_target(prod.require_output("k3sPublicIp"), prod.require_output("k3sInstanceId"),
                       settings.bootstrap.ssh_private_key)
    databases: list[pulumi.Resource] = [StageDatabase("database", settings.stage_facts, settings.db_password, host)]
    postgres = None
    if settings.database.has_rds_role:  # prod declares the instance once its own database leaves the host
        address = prod.require_output("rdsAddress")
        databases.append(RdsStageDatabase("database-rds", settings.stage_facts, settings.db_password, host, address))
        postgres = rds_endpoint(address, settings.network.vpc_cidr) if settings.database.on_rds else \
            PostgresEndpoint.migrating(settings.network.k3s_private_ip, settings.network.vpc_cidr)
    return StageBase(
        records=records, databases=databases, postgres=postgres, host=host,
        providers=kubernetes_providers(prod.require_output("kubeconfig"), prod.require_output("k3sInstanceId")),
        smtp_username=prod.require_output("sesSmtpUsername"), smtp_password=prod.require_output("sesSmtpPassword"),
        # Absent until prod's first `pulumi up` with this export; the VPN-only routes then admit nobody.
        vpn_private_ip=prod.get_output("vpnPrivateIp"), exports={},
    )


settings = load()
# An over-committed node stops the preview. prod's budget counts both stages' pods on its nodes (it owns
# the hosts and knows the agents), and the tables it adds up are code: prod's preview of the same change
# sees it. With agents, the preview also says where each app pod lands.
if settings.is_prod:
    budget = capacity.estate_report(settings.hosts.k3s_agents)
    capacity.check(budget)
    capacity.log_placement(budget)
adopt.use(settings.imports)  # before any resource: each asks whether it takes over a live object
base = prod_estate(settings) if settings.is_prod else qa_estate(settings)
apps = StageWorkloads("apps", stage=settings.stage_facts, network=settings.network, settings=settings.cluster,
                      db_password=settings.db_password, smtp_username=base.smtp_username,
                      smtp_password=base.smtp_password, providers=base.providers,
                      vpn_private_ip=base.vpn_private_ip, postgres=base.postgres,
                      opts=pulumi.ResourceOptions(depends_on=base.databases))
if settings.database.host_postgres == "remove":  # prod, its apps on RDS: stopped, never deleted
    HostPostgresStopped("host-postgres", base.host, after=[apps])

adopt.check_all_claimed()  # every import line named a resource of this stack

for name, value in base.exports.items():
    pulumi.export(name, value)
pulumi.export("dnsRecords", {name: record.records for name, record in base.records.records.items()})

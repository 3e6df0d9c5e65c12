"""PostgreSQL 16 on RDS (katforge:database), and what the k3s host keeps of its own PostgreSQL.

`RdsPostgres` (prod, while prod's database is `migrating` or `rds`): an RDS PostgreSQL 16 instance in the
default VPC, private, encrypted, with automated backups, deletion protection and a final snapshot; its
parameter group carries the host's tuning (infra/host/postgresql-katforge.conf), its subnet group is the
default VPC's subnets, and its security group admits the k3s nodes only (infra/network.py). Pulumi and
the operators cannot reach it (nothing outside the VPC can): the k3s host can, so the host keeps libpq's
settings for it in /etc/katforge/rds.env and the master password in a root-only pgpass file, and every
stage's role and database on RDS is made there (`RdsStageDatabase`, infra/host/rds-database.sh), as
the data is moved there (tools/migrate_database.py).

`HostPostgresStopped` (prod, katforge:hostPostgres remove): the host's PostgreSQL is stopped and masked,
its data left where it is; taking the line back out starts it again. Nothing here ever drops data.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import pulumi
import pulumi_aws as aws
import pulumi_command as command

from infra.apps import PostgresEndpoint
from infra.bootstrap import HOST_FILES, Target, install_file, run_script
from infra.policies import ESTATE_TAG
from infra.settings import RdsSettings, Stage

MASTER_USER = "katforge_admin"
IDENTIFIER = "katforge-postgres"
# RDS keeps the automated backups this many days (point-in-time restore within them).
BACKUP_RETENTION_DAYS = 7
# UTC, apart from each other and from the host's dumps at backupTime (03:30 by default).
BACKUP_WINDOW = "02:00-02:30"
MAINTENANCE_WINDOW = "sun:04:30-sun:05:00"
# libpq's settings for RDS as the master user, read by rds-database.sh and tools/migrate_database.py on the host.
RDS_ENV_FILE = "/etc/katforge/rds.env"
RDS_PGPASS_FILE = "/etc/katforge/rds.pgpass"
# RDS admits TLS connections only (rds.force_ssl is 1 by default from PostgreSQL 15 on, RDS User Guide,
# "Using SSL with a PostgreSQL DB instance"); without RDS's CA bundle in the images, `require` encrypts.
SSL_MODE = "require"
HOST_POSTGRES_UNIT = "postgresql@16-main"

# Settings PostgreSQL reads only at server start (PostgreSQL 16 documentation, "Server Configuration":
# "This parameter can only be set at server start"): RDS applies them at the next reboot.
_STATIC = frozenset({"shared_buffers", "max_connections", "autovacuum_max_workers"})
# RDS takes each value in the setting's own unit (pg_settings.unit): 8kB pages or kB.
_UNIT_KB = {"shared_buffers": 8, "effective_cache_size": 8, "work_mem": 1, "maintenance_work_mem": 1,
            "autovacuum_work_mem": 1}
_SIZE_KB = {"kB": 1, "MB": 1024, "GB": 1024 * 1024}


def rds_endpoint(address: pulumi.Input[str], vpc_cidr: str) -> PostgresEndpoint:
    """Where the apps of a stage on RDS reach it: its name, over TLS; the VPC's port 5432 in their policy."""
    return PostgresEndpoint(host=address, cidr=vpc_cidr, options=f"?sslmode={SSL_MODE}")


def parameters(conf: str) -> list[dict]:
    """The host's tuning (postgresql-katforge.conf) as RDS parameters, in the order the file has them."""
    found = []
    for name, value in re.findall(r"^\s*(\w+)\s*=\s*([^#\s]+)", conf, flags=re.M):
        size = re.fullmatch(r"(\d+)(kB|MB|GB)", value)
        if size:
            value = str(int(size.group(1)) * _SIZE_KB[size.group(2)] // _UNIT_KB[name])
        found.append({"name": name, "value": value,
                      "apply_method": "pending-reboot" if name in _STATIC else "immediate"})
    return found


def environment_file(address: str, port: int) -> str:
    return ("# Written by Pulumi (infra/database.py): libpq's settings for RDS as its master user.\n"
            f"PGHOST={address}\nPGPORT={port}\nPGUSER={MASTER_USER}\nPGSSLMODE={SSL_MODE}\n"
            f"PGPASSFILE={RDS_PGPASS_FILE}\n")


def pgpass(address: str, port: int, password: str) -> str:
    """libpq's password file: host:port:database:user:password, with : and \\ escaped."""
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    return f"{address}:{port}:*:{MASTER_USER}:{escaped}\n"


class RdsPostgres(pulumi.ComponentResource):
    """The RDS instance both stages' databases live on once they leave the host (prod)."""

    def __init__(self, name: str, rds: RdsSettings, vpc_id: str, security_group: aws.ec2.SecurityGroup,
                 host: Target, after: Sequence[pulumi.Resource] = (), opts: Optional[pulumi.ResourceOptions] = None):
        super().__init__("katforge:database:RdsPostgres", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = {ESTATE_TAG[0]: ESTATE_TAG[1]}
        subnets = aws.ec2.get_subnets(filters=[aws.ec2.GetSubnetsFilterArgs(name="vpc-id", values=[vpc_id]),
                                               aws.ec2.GetSubnetsFilterArgs(name="default-for-az", values=["true"])],
                                      opts=pulumi.InvokeOptions(parent=self))
        subnet_group = aws.rds.SubnetGroup(name, name=IDENTIFIER, subnet_ids=sorted(subnets.ids),
                                           description="The default VPC's subnets", tags=tags, opts=child)
        parameter_group = aws.rds.ParameterGroup(
            name, name=IDENTIFIER, family="postgres16", description="The k3s host's PostgreSQL tuning",
            parameters=parameters((HOST_FILES / "postgresql-katforge.conf").read_text()), tags=tags, opts=child)
        # Protected and deletion-protected: the estate's data. A replacement would start empty.
        self.instance = aws.rds.Instance(
            name, identifier=IDENTIFIER, engine="postgres", engine_version="16", instance_class=rds.instance_class,
            allocated_storage=rds.allocated_storage_gb, storage_type="gp3", storage_encrypted=True,
            db_subnet_group_name=subnet_group.name, vpc_security_group_ids=[security_group.id],
            parameter_group_name=parameter_group.name, publicly_accessible=False, multi_az=False,
            username=MASTER_USER, password=rds.master_password,
            backup_retention_period=BACKUP_RETENTION_DAYS, backup_window=BACKUP_WINDOW,
            maintenance_window=MAINTENANCE_WINDOW, auto_minor_version_upgrade=True, allow_major_version_upgrade=False,
            deletion_protection=True, skip_final_snapshot=False, final_snapshot_identifier=f"{IDENTIFIER}-final",
            copy_tags_to_snapshot=True, tags={"Name": IDENTIFIER, **tags},
            opts=pulumi.ResourceOptions(parent=self, protect=True, additional_secret_outputs=["password"]))
        self.address = self.instance.address
        self.port = self.instance.port
        endpoint = pulumi.Output.all(self.address, self.port)
        self.files = [
            install_file(self, f"{name}-env", host, RDS_ENV_FILE, endpoint.apply(lambda e: environment_file(*e)),
                         mode="0644", after=after),
            install_file(self, f"{name}-pgpass", host, RDS_PGPASS_FILE, pulumi.Output.secret(
                pulumi.Output.all(self.address, self.port, rds.master_password).apply(lambda e: pgpass(*e))),
                         mode="0600", after=after),
        ]
        self.register_outputs({"address": self.address, "port": self.port})


class RdsStageDatabase(pulumi.ComponentResource):
    """A stage's login role and database on RDS, made on the k3s host as RDS's master user (both stacks)."""

    def __init__(self, name: str, stage: Stage, password: pulumi.Input[str], host: Target, endpoint: pulumi.Input[str],
                 after: Sequence[pulumi.Resource] = (), opts: Optional[pulumi.ResourceOptions] = None):
        super().__init__("katforge:database:RdsStageDatabase", name, None, opts)
        # The endpoint in the environment: a new instance (another address) runs the script again.
        self.database = run_script(
            self, f"{name}-role", host, stage.name, "rds-database.sh",
            environment={"PG_ROLE": stage.db_role, "PG_DATABASE": stage.database, "RDS_ENDPOINT": endpoint},
            stdin=pulumi.Output.secret(password), after=after)
        self.register_outputs({"database": stage.database, "role": stage.db_role})


class HostPostgresStopped(pulumi.ComponentResource):
    """The k3s host's PostgreSQL stopped and masked (no start at boot, nor by anything else); its data
    stays on the volume. Deleting this (hostPostgres back to keep) unmasks and starts it again."""

    def __init__(self, name: str, host: Target, after: Sequence[pulumi.Resource] = (),
                 opts: Optional[pulumi.ResourceOptions] = None):
        super().__init__("katforge:database:HostPostgresStopped", name, None, opts)
        command.remote.Command(
            name, connection=host.connection, create=f"sudo systemctl mask --now {HOST_POSTGRES_UNIT}",
            delete=f"sudo systemctl unmask {HOST_POSTGRES_UNIT} && sudo systemctl start {HOST_POSTGRES_UNIT}",
            triggers=[host.identity], add_previous_output_in_env=False,
            opts=pulumi.ResourceOptions(parent=self, depends_on=list(after)))
        self.register_outputs({"unit": HOST_POSTGRES_UNIT})

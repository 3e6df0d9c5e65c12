"""Daily pg_dump of every stage database to S3, the bucket that keeps the dumps, restores, a monthly
restore drill, and mail to the operators when any of it fails.

`BackupStorage` (prod, before the hosts): the bucket, the k3s host's writer role and instance profile,
and the managed policy operators attach to restore. `BackupAlerts`: the IAM user whose SES SMTP
credentials let the host mail the operators, from the backup address to the ops address only.
`BackupSchedule` (after the host bootstrap): on the k3s host the backup, restore and drill scripts,
the alert sender and the backup watchdog, and their systemd timers. The schedule is a host timer, not a
CronJob, because pods cannot reach the instance role (IMDS hop limit 1) while the host can: no static
AWS key exists for the backups (the SMTP credentials are SES's own kind, usable for nothing else).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pulumi
import pulumi_aws as aws
import pulumi_command as command

from infra import adopt
from infra.bootstrap import Target, install_file
from infra.email import SMTP_ENDPOINT, SMTP_PORT
from infra.iam import sole_policy
from infra.policies import BACKUP_WRITER_ROLE, backup_alert_policy, document
from infra.settings import REGION, BackupSettings, Stage

HOST_FILES = Path(__file__).resolve().parent / "host"
UNIT = "katforge-backup"
ENVIRONMENT_FILE = "/etc/katforge/backup.env"
ALERT_ENVIRONMENT_FILE = "/etc/katforge/alert.env"
ALERT_PASSWORD_FILE = "/etc/katforge/alert-smtp-password"
NONCURRENT_DAYS = 7  # how long an overwritten or expired dump stays recoverable as an old version
# The writer cannot abort a failed multipart upload (no s3:AbortMultipartUpload); S3 drops the parts.
INCOMPLETE_UPLOAD_DAYS = 1


def writer_policy(bucket_arn: str, stages: Iterable[str]) -> str:
    """The host may add dumps under each stage's prefix and read them back (a HEAD confirms an upload whose
    answer was lost; the drill and the restore on the host read them), but never delete or overwrite a
    version away: no s3:DeleteObject*, no s3:GetObjectVersion, and versioning keeps an overwritten dump.
    Reading discloses nothing the host does not hold already: the live databases are on it."""
    objects = [f"{bucket_arn}/{stage}/*" for stage in sorted(stages)]
    return document(
        # Also covers the multipart upload calls the AWS CLI makes for large files.
        {"Sid": "PutDumps", "Effect": "Allow", "Action": "s3:PutObject", "Resource": objects},
        {"Sid": "ReadDumps", "Effect": "Allow", "Action": "s3:GetObject", "Resource": objects},
        {"Sid": "FindDumps", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": bucket_arn},
    )


def restore_policy(bucket_arn: str) -> str:
    """What an operator needs to run the restore script: find the dumps and download one."""
    return document(
        {"Sid": "FindDumps", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": bucket_arn},
        {"Sid": "ReadDumps", "Effect": "Allow", "Action": "s3:GetObject", "Resource": f"{bucket_arn}/*"},
    )


def tls_only_policy(bucket_arn: str) -> str:
    return document({
        "Sid": "DenyPlainHttp",
        "Effect": "Deny",
        "Principal": "*",
        "Action": "s3:*",
        "Resource": [bucket_arn, f"{bucket_arn}/*"],
        "Condition": {"Bool": {"aws:SecureTransport": "false"}},
    })


def ec2_trust_policy() -> str:
    return document({"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"})


def backup_targets(stages: Iterable[Stage]) -> str:
    """The backup script's arguments: every stage's database as STAGE:DATABASE."""
    return " ".join(f"{stage.name}:{stage.database}" for stage in stages)


def stage_namespaces(stages: Iterable[Stage]) -> str:
    """Where each stage's apps run, as STAGE:NAMESPACE: the Deployments `katforge-restore --stop-apps` scales."""
    return " ".join(f"{stage.name}:{stage.namespace}" for stage in stages)


def environment_file(bucket: str, region: str, targets: str, namespaces: str) -> str:
    return (
        "# Written by Pulumi (infra/backups.py); read by the backup, watchdog and drill units and by\n"
        "# katforge-restore.\n"
        f"BACKUP_BUCKET={bucket}\n"
        f"AWS_DEFAULT_REGION={region}\n"
        f'BACKUP_TARGETS="{targets}"\n'
        f'STAGE_NAMESPACES="{namespaces}"\n'
    )


def alert_environment_file(smtp_user: str, alert_from: str, alert_to: str) -> str:
    return (
        "# Written by Pulumi (infra/backups.py); read by katforge-alert (infra/host/send-alert.py).\n"
        f"ALERT_SMTP_HOST={SMTP_ENDPOINT}\n"
        f"ALERT_SMTP_PORT={SMTP_PORT}\n"
        f"ALERT_SMTP_USER={smtp_user}\n"
        f"ALERT_FROM={alert_from}\n"
        f"ALERT_TO={alert_to}\n"
        f"ALERT_SMTP_PASSWORD_FILE={ALERT_PASSWORD_FILE}\n"
    )


def timer_unit(time_utc: str) -> str:
    return (
        "[Unit]\n"
        f"Description=Daily Katforge database backup at {time_utc} UTC\n"
        "\n"
        "[Timer]\n"
        f"OnCalendar=*-*-* {time_utc}:00 UTC\n"
        # A run missed while the host was down happens at the next boot.
        "Persistent=true\n"
        "\n"
        "[Install]\n"
        "WantedBy=timers.target\n"
    )


class BackupStorage(pulumi.ComponentResource):
    """The backup bucket and the identities that write to it (the host) and read from it (operators)."""

    def __init__(self, name: str, backups: BackupSettings, stages: Iterable[Stage],
                 permissions_boundary: pulumi.Input[str] | None = None, opts: pulumi.ResourceOptions | None = None):
        """`permissions_boundary`: the estate's boundary policy (infra/pipeline.py), the most the writer can do."""
        super().__init__("katforge:backups:BackupStorage", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)

        def adopted(type_: str, resource: str, **more) -> pulumi.ResourceOptions:
            """Options of a resource whose name is unique in the account: a live one is imported."""
            return pulumi.ResourceOptions(parent=self, import_=adopt.import_id(type_, resource), **more)

        # The only copy of production data outside the host: never deleted by a stack change.
        self.bucket = aws.s3.Bucket(name, bucket=backups.bucket, opts=adopted("Bucket", name, protect=True))
        # The bucket's settings below are resources of their own whose create only PUTs the setting on the
        # bucket, so on an imported bucket they take over (and replace) the live settings without any
        # import or collision: versioning, encryption and the public access block; the policy and the
        # lifecycle rules are the program's whole policy and whole rule set.
        aws.s3.BucketVersioning(name, bucket=self.bucket.id,
                                versioning_configuration={"status": "Enabled"}, opts=child)
        aws.s3.BucketServerSideEncryptionConfiguration(
            name, bucket=self.bucket.id,
            rules=[{"apply_server_side_encryption_by_default": {"sse_algorithm": "AES256"}}], opts=child)
        public_access = aws.s3.BucketPublicAccessBlock(
            name, bucket=self.bucket.id, block_public_acls=True, block_public_policy=True,
            ignore_public_acls=True, restrict_public_buckets=True, opts=child)
        # S3 rejects a policy written while the public access block is still being applied.
        aws.s3.BucketPolicy(name, bucket=self.bucket.id, policy=self.bucket.arn.apply(tls_only_policy),
                            opts=pulumi.ResourceOptions(parent=self, depends_on=[public_access]))
        aws.s3.BucketLifecycleConfiguration(
            name, bucket=self.bucket.id,
            rules=[{
                "id": "expire-dumps",
                "status": "Enabled",
                "filter": {"prefix": ""},
                "expiration": {"days": backups.retention_days},
                "noncurrent_version_expiration": {"noncurrent_days": NONCURRENT_DAYS},
                "abort_incomplete_multipart_upload": {"days_after_initiation": INCOMPLETE_UPLOAD_DAYS},
            }],
            opts=child)

        stage_names = [stage.name for stage in stages]
        role = aws.iam.Role(f"{name}-writer", name=BACKUP_WRITER_ROLE, permissions_boundary=permissions_boundary,
                            assume_role_policy=ec2_trust_policy(), opts=adopted("Role", f"{name}-writer"))
        # Named by Pulumi (a suffix of its own): it never meets an inline policy the live role has.
        aws.iam.RolePolicy(f"{name}-writer", role=role.id,
                           policy=self.bucket.arn.apply(lambda arn: writer_policy(arn, stage_names)), opts=child)
        profile = aws.iam.InstanceProfile(f"{name}-writer", name="katforge-k3s-host", role=role.name,
                                          opts=adopted("InstanceProfile", f"{name}-writer"))
        restore = aws.iam.Policy(f"{name}-restore", name="katforge-backup-restore",
                                 description="Attach to an operator to run `make restore`.",
                                 policy=self.bucket.arn.apply(restore_policy),
                                 opts=adopted("Policy", f"{name}-restore"))

        self.bucket_name = self.bucket.bucket
        self.instance_profile_name = profile.name
        self.restore_policy_arn = restore.arn
        self.register_outputs({"bucket": self.bucket_name, "instance_profile_name": self.instance_profile_name,
                               "restore_policy_arn": self.restore_policy_arn})


class BackupAlerts(pulumi.ComponentResource):
    """The IAM user whose SES SMTP credentials the k3s host mails alerts with: from `alert_from` to
    `alert_to`, through the SES identity of `domain`, and nothing else."""

    def __init__(self, name: str, backups: BackupSettings, domain: str,
                 permissions_boundary: pulumi.Input[str] | None = None, opts: pulumi.ResourceOptions | None = None):
        super().__init__("katforge:backups:BackupAlerts", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        # The identity by name, in any account: only this account's own identity can be used by its user
        # (another account's would need a sending authorization policy granting it), and the name needs no
        # lookup of the account (infra/email.py does not export the identity's ARN).
        identity = f"arn:aws:ses:{REGION}:*:identity/{domain}"
        user = aws.iam.User(name, name="katforge-backup-alerts", permissions_boundary=permissions_boundary, opts=child)
        policy = aws.iam.UserPolicy(name, user=user.name, opts=child,
                                    policy=backup_alert_policy(identity, backups.alert_from, [backups.alert_to]))
        sole_policy(name, user, policy, self)  # as every user of the estate: its one inline policy, nothing else
        key = aws.iam.AccessKey(name, user=user.name, opts=pulumi.ResourceOptions(
            parent=self, additional_secret_outputs=["secret", "sesSmtpPasswordV4"]))
        self.smtp_username = pulumi.Output.secret(key.id)
        self.smtp_password = pulumi.Output.secret(key.ses_smtp_password_v4)
        self.register_outputs({"user": user.name})


@dataclass(frozen=True)
class HostFile:
    name: str
    path: str
    mode: str
    content: pulumi.Input[str]


class BackupSchedule(pulumi.ComponentResource):
    """On the k3s host: the backup, restore and drill scripts, the alert sender, the backup watchdog, and
    their systemd units (daily backup, hourly watchdog, monthly drill of each stage)."""

    def __init__(self, name: str, backups: BackupSettings, stages: Iterable[Stage], storage: BackupStorage,
                 alerts: BackupAlerts, target: Target, postgres_ready: pulumi.Resource,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("katforge:backups:BackupSchedule", name, None, opts)
        # Everything waits for the bootstrap: the host answers SSH and PostgreSQL holds every database.
        after_bootstrap = pulumi.ResourceOptions(parent=self, depends_on=[postgres_ready])
        stages = list(stages)
        targets, namespaces = backup_targets(stages), stage_namespaces(stages)
        environment = storage.bucket_name.apply(lambda bucket: environment_file(bucket, REGION, targets, namespaces))
        alert_environment = pulumi.Output.secret(alerts.smtp_username.apply(
            lambda user: alert_environment_file(user, backups.alert_from, backups.alert_to)))

        def host(source: str) -> str:
            return (HOST_FILES / source).read_text()

        files = [
            HostFile("script", f"/usr/local/sbin/{UNIT}", "0755", host("backup-databases.sh")),
            HostFile("restore", "/usr/local/sbin/katforge-restore", "0755", host("restore-database.sh")),
            HostFile("drill", "/usr/local/sbin/katforge-drill", "0755", host("drill-database.sh")),
            HostFile("watchdog", "/usr/local/sbin/katforge-backup-watchdog", "0755", host("backup-watchdog.sh")),
            HostFile("alert", "/usr/local/sbin/katforge-alert", "0755", host("send-alert.py")),
            HostFile("checksums", "/usr/local/lib/katforge/table-checksums.sql", "0644", host("table-checksums.sql")),
            HostFile("service", f"/etc/systemd/system/{UNIT}.service", "0644", host("backup-databases.service")),
            HostFile("timer", f"/etc/systemd/system/{UNIT}.timer", "0644", timer_unit(backups.time_utc)),
            HostFile("watchdog-service", "/etc/systemd/system/katforge-backup-watchdog.service", "0644",
                     host("backup-watchdog.service")),
            HostFile("watchdog-timer", "/etc/systemd/system/katforge-backup-watchdog.timer", "0644",
                     host("backup-watchdog.timer")),
            HostFile("drill-service", "/etc/systemd/system/katforge-drill@.service", "0644",
                     host("drill-database@.service")),
            HostFile("drill-timer", "/etc/systemd/system/katforge-drill@.timer", "0644", host("drill-database@.timer")),
            HostFile("environment", ENVIRONMENT_FILE, "0644", environment),
            # The SES user's name and its SMTP password: root's alone, written from stdin, never a command line.
            HostFile("alert-environment", ALERT_ENVIRONMENT_FILE, "0600", alert_environment),
            HostFile("alert-password", ALERT_PASSWORD_FILE, "0600",
                     pulumi.Output.secret(alerts.smtp_password.apply(lambda password: password + "\n"))),
        ]
        # The snap is AWS's own build of CLI v2; Ubuntu 24.04 has no awscli package.
        # A replaced host (new instance ID) gets everything again.
        aws_cli = command.remote.Command(
            f"{name}-aws-cli", connection=target.connection,
            create="snap list aws-cli >/dev/null 2>&1 || sudo snap install aws-cli --classic",
            triggers=[target.identity], add_previous_output_in_env=False, opts=after_bootstrap)
        installed = [install_file(self, f"{name}-{file.name}", target, file.path, file.content, mode=file.mode,
                                  after=[postgres_ready])
                     for file in files]
        timers = " ".join([f"{UNIT}.timer", "katforge-backup-watchdog.timer",
                           *(f"katforge-drill@{stage.name}.timer" for stage in stages)])
        command.remote.Command(
            f"{name}-enable", connection=target.connection,
            create=f"sudo systemctl daemon-reload && sudo systemctl enable {timers} && sudo systemctl restart {timers}",
            delete=f"sudo systemctl disable --now {timers}",
            # A changed script or unit re-runs this, so systemd reads the new units. The environment files
            # are read at each start (and two are secret, which would hide every trigger in the plan).
            triggers=[target.identity, *(file.content for file in files if file.path.startswith("/usr/") or
                                          file.path.startswith("/etc/systemd/"))],
            add_previous_output_in_env=False,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[aws_cli, *installed]))
        self.register_outputs({"timers": timers})

"""The backup bucket, its identities and the host timer as the prod plan declares them."""
import json
import shutil
import subprocess

import pytest

from infra.backups import HOST_FILES, timer_unit
from infra.settings import STAGES
from tools.offline import SECRET, evaluate, evaluate_cached

BUCKET_TYPE = "aws:s3/bucket:Bucket"
COMMAND = "command:remote:Command"


def one(plan, token, name=None):
    [resource] = [r for r in plan.of_type(token) if name is None or r.name == name]
    return resource


def bucket_arn(plan) -> str:
    # The offline cloud names every ARN after the resource's logical name.
    return "arn:aws:s3:us-east-2:123456789012:" + one(plan, BUCKET_TYPE).name


def statements(resource, key="policy"):
    return json.loads(resource.inputs[key])["Statement"]


def command(plan, suffix):
    return plan.named(f"backup-schedule-{suffix}")


# --- the bucket ---------------------------------------------------------------------------------

def test_the_bucket_is_named_by_config_and_protected(prod):
    bucket = one(prod, BUCKET_TYPE)
    assert bucket.inputs["bucket"] == "katforge-db-backups"
    assert bucket.options["protect"] is True
    assert not bucket.inputs.get("forceDestroy")
    assert prod.outputs["backupBucket"] == "katforge-db-backups"


def test_the_bucket_is_versioned_encrypted_and_private(prod):
    bucket_id = one(prod, BUCKET_TYPE).name + "-id"
    versioning = one(prod, "aws:s3/bucketVersioning:BucketVersioning").inputs
    assert versioning["bucket"] == bucket_id
    assert versioning["versioningConfiguration"] == {"status": "Enabled"}
    sse = one(prod, "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration").inputs
    assert sse["bucket"] == bucket_id
    assert sse["rules"] == [{"applyServerSideEncryptionByDefault": {"sseAlgorithm": "AES256"}}]
    block = one(prod, "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock").inputs
    assert block == {"bucket": bucket_id, "blockPublicAcls": True, "blockPublicPolicy": True,
                     "ignorePublicAcls": True, "restrictPublicBuckets": True}


def test_the_bucket_policy_denies_everything_without_tls(prod):
    policy = one(prod, "aws:s3/bucketPolicy:BucketPolicy")
    arn = bucket_arn(prod)
    assert statements(policy) == [{
        "Sid": "DenyPlainHttp", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
        "Resource": [arn, f"{arn}/*"], "Condition": {"Bool": {"aws:SecureTransport": "false"}},
    }]
    block = one(prod, "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock")
    assert block.urn in policy.options["depends_on"]


@pytest.mark.parametrize("days", [None, 9])
def test_dumps_expire_after_the_configured_days_and_old_versions_after_7(days):
    plan = evaluate_cached("prod") if days is None else evaluate("prod", {"katforge:backupRetentionDays": days})
    [rule] = one(plan, "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration").inputs["rules"]
    assert rule["status"] == "Enabled"
    assert rule["filter"] == {"prefix": ""}  # every dump
    assert rule["expiration"] == {"days": 30 if days is None else days}
    assert rule["noncurrentVersionExpiration"] == {"noncurrentDays": 7}
    assert rule["abortIncompleteMultipartUpload"] == {"daysAfterInitiation": 1}


# --- identities ---------------------------------------------------------------------------------

def test_the_writer_may_put_and_read_objects_under_the_stage_prefixes_and_list_them(prod):
    arn = bucket_arn(prod)
    role = one(prod, "aws:iam/role:Role", "backups-writer")
    role_refs = {role.name + "-id", role.inputs["name"]}
    # The writer's one and only policy.
    [policy] = [p for p in prod.of_type("aws:iam/rolePolicy:RolePolicy") if p.inputs["role"] in role_refs]
    assert [p for p in prod.of_type("aws:iam/rolePolicyAttachment:RolePolicyAttachment")
            if p.inputs["role"] in role_refs] == []
    objects = sorted(f"{arn}/{stage}/*" for stage in ("prod", "qa"))
    assert statements(policy) == [
        {"Sid": "PutDumps", "Effect": "Allow", "Action": "s3:PutObject", "Resource": objects},
        {"Sid": "ReadDumps", "Effect": "Allow", "Action": "s3:GetObject", "Resource": objects},
        {"Sid": "FindDumps", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": arn},
    ]
    assert statements(role, "assumeRolePolicy") == [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]


def test_the_k3s_host_wears_the_writer_profile_and_the_vpn_host_none(prod):
    profile = one(prod, "aws:iam/instanceProfile:InstanceProfile")
    role = one(prod, "aws:iam/role:Role", "backups-writer")
    assert profile.inputs["role"] == role.inputs["name"]
    instances = {r.name: r for r in prod.of_type("aws:ec2/instance:Instance")}
    assert instances["k3s"].inputs["iamInstanceProfile"] == profile.inputs["name"]
    assert profile.urn in instances["k3s"].options["depends_on"]
    assert "iamInstanceProfile" not in instances["vpn"].inputs


def test_operators_restore_with_a_read_only_policy(prod):
    arn = bucket_arn(prod)
    policy = one(prod, "aws:iam/policy:Policy", "backups-restore")
    assert statements(policy) == [
        {"Sid": "FindDumps", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": arn},
        {"Sid": "ReadDumps", "Effect": "Allow", "Action": "s3:GetObject", "Resource": f"{arn}/*"},
    ]
    assert prod.outputs["backupRestorePolicyArn"].endswith(":backups-restore")


def test_qa_declares_no_backup_resources():
    qa = evaluate_cached("qa")
    assert [r.urn for r in qa.resources if "backup" in r.urn.lower()] == []


# --- the schedule on the host -------------------------------------------------------------------

# Each host file from the repository, where it lands and with which mode.
HOST_INSTALLS = {
    "script": ("backup-databases.sh", "/usr/local/sbin/katforge-backup", "0755"),
    "restore": ("restore-database.sh", "/usr/local/sbin/katforge-restore", "0755"),
    "drill": ("drill-database.sh", "/usr/local/sbin/katforge-drill", "0755"),
    "watchdog": ("backup-watchdog.sh", "/usr/local/sbin/katforge-backup-watchdog", "0755"),
    "alert": ("send-alert.py", "/usr/local/sbin/katforge-alert", "0755"),
    "checksums": ("table-checksums.sql", "/usr/local/lib/katforge/table-checksums.sql", "0644"),
    "service": ("backup-databases.service", "/etc/systemd/system/katforge-backup.service", "0644"),
    "watchdog-service": ("backup-watchdog.service", "/etc/systemd/system/katforge-backup-watchdog.service", "0644"),
    "watchdog-timer": ("backup-watchdog.timer", "/etc/systemd/system/katforge-backup-watchdog.timer", "0644"),
    "drill-service": ("drill-database@.service", "/etc/systemd/system/katforge-drill@.service", "0644"),
    "drill-timer": ("drill-database@.timer", "/etc/systemd/system/katforge-drill@.timer", "0644"),
}


def test_the_host_gets_the_tested_scripts_and_units(prod):
    installs = {r.name: r.inputs for r in prod.of_type(COMMAND) if r.name.startswith("backup-schedule-")}
    for name, (source, path, mode) in HOST_INSTALLS.items():
        assert installs[f"backup-schedule-{name}"]["stdin"] == (HOST_FILES / source).read_text(), name
        assert installs[f"backup-schedule-{name}"]["create"] == f"sudo install -D -m {mode} /dev/stdin {path}", name
    service = installs["backup-schedule-service"]["stdin"]
    # The unit runs the installed script with the environment file Pulumi writes.
    assert "ExecStart=/usr/local/sbin/katforge-backup $BACKUP_TARGETS\n" in service
    assert "EnvironmentFile=/etc/katforge/backup.env\n" in service
    assert installs["backup-schedule-environment"]["create"].endswith(" /etc/katforge/backup.env")


def test_the_smtp_password_reaches_the_host_on_stdin_into_a_file_only_root_reads(prod):
    for name, path in (("alert-password", "/etc/katforge/alert-smtp-password"), ("alert-environment", "/etc/katforge/alert.env")):
        install = command(prod, name)
        assert install.inputs["create"] == f"sudo install -D -m 0600 /dev/stdin {path}"
        assert install.inputs["stdin"] == SECRET  # secret in the plan and the state, never on a command line
    key = one(prod, "aws:iam/accessKey:AccessKey", "backup-alerts")
    assert {"secret", "sesSmtpPasswordV4"} <= set(key.options["additional_secret_outputs"])


def test_the_alert_user_may_only_mail_the_ops_address_from_the_backup_address(prod):
    user = one(prod, "aws:iam/user:User", "backup-alerts")
    assert user.inputs["name"] == "katforge-backup-alerts"
    [policy] = [p for p in prod.of_type("aws:iam/userPolicy:UserPolicy") if p.name == "backup-alerts"]
    assert statements(policy) == [{
        "Sid": "MailOpsFromTheBackupAddress", "Effect": "Allow", "Action": "ses:SendRawEmail",
        "Resource": "arn:aws:ses:us-east-2:*:identity/katforge.com",
        "Condition": {"StringEquals": {"ses:FromAddress": "backups@katforge.com"},
                      "ForAllValues:StringEquals": {"ses:Recipients": ["ops@katforge.com"]}},
    }]
    assert [p for p in prod.of_type("aws:iam/userPolicyAttachment:UserPolicyAttachment")
            if p.inputs.get("user") in (user.name + "-id", "katforge-backup-alerts")] == []


def test_the_alert_addresses_come_from_config():
    plan = evaluate("prod", {"katforge:backupAlertFrom": "db@katforge.com", "katforge:opsEmail": "oncall@example.org"})
    [policy] = [p for p in plan.of_type("aws:iam/userPolicy:UserPolicy") if p.name == "backup-alerts"]
    [statement] = statements(policy)
    assert statement["Condition"] == {"StringEquals": {"ses:FromAddress": "db@katforge.com"},
                                      "ForAllValues:StringEquals": {"ses:Recipients": ["oncall@example.org"]}}


def test_every_stage_database_is_dumped_to_the_bucket(prod):
    environment = command(prod, "environment").inputs["stdin"].splitlines()
    assert "BACKUP_BUCKET=katforge-db-backups" in environment
    assert "AWS_DEFAULT_REGION=us-east-2" in environment
    [targets] = [line for line in environment if line.startswith("BACKUP_TARGETS=")]
    assert targets.split("=", 1)[1].strip('"').split() == ["prod:katforge", "qa:katforge_qa"]
    assert {t.split(":")[1] for t in targets.split("=", 1)[1].strip('"').split()} == \
        {stage.database for stage in STAGES.values()}
    # Where katforge-restore --stop-apps finds each stage's Deployments.
    assert 'STAGE_NAMESPACES="prod:default qa:qa"' in environment


@pytest.mark.parametrize("time_utc", [None, "01:05"])
def test_the_timer_fires_daily_at_the_configured_utc_time(time_utc):
    plan = evaluate_cached("prod") if time_utc is None else evaluate("prod", {"katforge:backupTime": time_utc})
    timer = command(plan, "timer")
    expected = "03:30" if time_utc is None else time_utc
    assert f"\nOnCalendar=*-*-* {expected}:00 UTC\n" in timer.inputs["stdin"]
    assert "\nPersistent=true\n" in timer.inputs["stdin"]
    assert timer.inputs["create"].endswith(" /etc/systemd/system/katforge-backup.timer")
    enable = command(plan, "enable")
    assert timer.inputs["stdin"] in enable.inputs["triggers"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_timer_schedule():
    [line] = [l for l in timer_unit("23:59").splitlines() if l.startswith("OnCalendar=")]
    result = subprocess.run(["systemd-analyze", "calendar", line.split("=", 1)[1]], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Normalized form: *-*-* 23:59:00 UTC" in result.stdout


def test_the_schedule_is_installed_after_postgres_and_enabled_last(prod):
    postgres = prod.named("bootstrap-postgres-config")
    instance = next(r for r in prod.of_type("aws:ec2/instance:Instance") if r.name == "k3s")
    schedule = [r for r in prod.of_type(COMMAND) if r.name.startswith("backup-schedule-")]
    enable = command(prod, "enable")
    installs = [r for r in schedule if r is not enable]
    assert {r.name.removeprefix("backup-schedule-") for r in installs} == \
        {"aws-cli", "timer", "environment", "alert-environment", "alert-password", *HOST_INSTALLS}
    for install in installs:
        assert postgres.urn in install.options["depends_on"], install.name
        # A replaced host (new instance ID) gets the schedule again.
        assert instance.name + "-id" in install.inputs["triggers"], install.name
    assert {r.urn for r in installs} <= set(enable.options["depends_on"])
    timers = "katforge-backup.timer katforge-backup-watchdog.timer katforge-drill@prod.timer katforge-drill@qa.timer"
    assert enable.inputs["create"] == (f"sudo systemctl daemon-reload && sudo systemctl enable {timers} && "
                                       f"sudo systemctl restart {timers}")
    assert enable.inputs["delete"] == f"sudo systemctl disable --now {timers}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_units(tmp_path):
    """Each unit under the name it is installed as. Its programs are not installed here: systemd says so,
    and must say nothing else (an unknown key or a bad value is only a warning, so any line fails)."""
    for source, path, mode in HOST_INSTALLS.values():
        if path.startswith("/etc/systemd/"):
            (tmp_path / path.rsplit("/", 1)[1]).write_text((HOST_FILES / source).read_text())
    (tmp_path / "katforge-backup.timer").write_text(timer_unit("03:30"))
    names = ["katforge-backup.service", "katforge-backup.timer", "katforge-backup-watchdog.service",
             "katforge-backup-watchdog.timer", "katforge-drill@prod.service", "katforge-drill@prod.timer"]
    result = subprocess.run(["systemd-analyze", "verify", *names], cwd=tmp_path, capture_output=True, text=True)
    assert sorted(result.stderr.splitlines()) == sorted(
        f"{unit}: Command /usr/local/sbin/{program} is not executable: No such file or directory"
        for unit, program in (("katforge-backup.service", "katforge-backup"),
                              ("katforge-backup-watchdog.service", "katforge-backup-watchdog"),
                              ("katforge-drill@prod.service", "katforge-drill"))), result.stderr

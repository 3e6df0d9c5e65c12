"""PostgreSQL on RDS (katforge:database): the instance and what surrounds it, the apps' DATABASE_URL and
policies, the `migrating` step, qa on prod's instance, the host's PostgreSQL kept until an operator says
otherwise, the settings' refusals, rds-database.sh against a real PostgreSQL 16 whose master user is no
superuser; and every scaled plan (agents, RDS) through the estate's checks: Kubernetes' schemas, checkov,
the policy pack, the force-new table."""
from __future__ import annotations

import copy
import json
import subprocess
import uuid
from functools import lru_cache
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from infra import database
from infra.bootstrap import HOST_FILES
from infra.settings import SettingsError
from policy import rules
from policy.pack import POLICIES, keep_secrets_marked
from tests import scaled
from tests.shared import checkov
from tests.test_agents import ingress
from tests.test_cluster import CRD_KINDS
from tests.test_policy_pack import CHECKS, analyze
from tools import force_new
from tools.offline import SecretValue, effective_config, evaluate, evaluate_cached, unwrap

COMMAND = "command:remote:Command"
RDS = "aws:rds/instance:Instance"
ADDRESS = "katforge-postgres.c0ffline0plan.us-east-2.rds.amazonaws.com"
CONF = (HOST_FILES / "postgresql-katforge.conf").read_text()


@lru_cache(maxsize=None)
def migrating():
    return evaluate("prod", {**scaled.RDS, "katforge:database": "migrating"})


def database_url(plan) -> str:
    return unwrap(plan.named("apps-database").raw_inputs["stringData"])["DATABASE_URL"]


def test_the_instance_is_postgresql_16_private_encrypted_backed_up_and_protected():
    plan = scaled.rds()
    instance = plan.named("rds", RDS)
    i = instance.inputs
    assert (i["engine"], i["engineVersion"], i["identifier"]) == ("postgres", "16", "katforge-postgres")
    assert i["publiclyAccessible"] is False and i["storageEncrypted"] is True and i["storageType"] == "gp3"
    assert i["backupRetentionPeriod"] == 7 and i["deletionProtection"] is True and i["skipFinalSnapshot"] is False
    assert i["finalSnapshotIdentifier"] == "katforge-postgres-final" and i["copyTagsToSnapshot"] is True
    assert (i["instanceClass"], i["allocatedStorage"], i["username"]) == ("db.t4g.small", 20, "katforge_admin")
    assert i["autoMinorVersionUpgrade"] is True and i["allowMajorVersionUpgrade"] is False
    assert i["password"] == "[secret]" and unwrap(instance.raw_inputs["password"]) == scaled.RDS_MASTER_PASSWORD
    assert instance.options["protect"]
    # The backup window ends before the host's dumps (03:30) and the maintenance window starts.
    assert i["backupWindow"] == "02:00-02:30" and i["maintenanceWindow"] == "sun:04:30-sun:05:00"
    group = plan.named("rds", "aws:rds/subnetGroup:SubnetGroup")
    assert group.inputs["subnetIds"] == sorted(["subnet-0a1b2c3d4e5f60001", "subnet-0a1b2c3d4e5f60002",
                                                "subnet-0a1b2c3d4e5f60003"])
    assert plan.lookups_of("aws:ec2/getSubnets:getSubnets") == [{"filters": [
        {"name": "vpc-id", "values": ["vpc-0a1b2c3d4e5f60718"]}, {"name": "default-for-az", "values": ["true"]}]}]
    refs = instance.options["property_dependencies"]
    assert refs["dbSubnetGroupName"] == [group.urn]
    assert refs["parameterGroupName"] == [plan.named("rds", "aws:rds/parameterGroup:ParameterGroup").urn]
    assert refs["vpcSecurityGroupIds"] == [plan.named("rds", "aws:ec2/securityGroup:SecurityGroup").urn]
    assert plan.outputs["rdsAddress"] == ADDRESS


def test_the_parameter_group_carries_the_hosts_tuning_in_rdss_units():
    group = scaled.rds().named("rds", "aws:rds/parameterGroup:ParameterGroup").inputs
    assert group["family"] == "postgres16"
    assert {p["name"]: (p["value"], p["applyMethod"]) for p in group["parameters"]} == {
        "shared_buffers": ("32768", "pending-reboot"),  # 256MB in 8kB pages
        "effective_cache_size": ("131072", "immediate"),  # 1GB in 8kB pages
        "work_mem": ("4096", "immediate"), "maintenance_work_mem": ("65536", "immediate"),  # kB
        "autovacuum_max_workers": ("2", "pending-reboot"), "autovacuum_work_mem": ("32768", "immediate"),
        "max_connections": ("60", "pending-reboot"), "password_encryption": ("scram-sha-256", "immediate")}
    # Every setting of the host's file, none left behind.
    assert len(group["parameters"]) == len([line for line in CONF.splitlines() if line and line[0].isalpha()])


def test_rds_admits_the_k3s_nodes_only_and_opens_nothing_itself(prod):
    assert not [rule for rule in ingress(prod) if rule[0] == "rds"]
    assert {rule for rule in ingress(scaled.rds()) if rule[0] == "rds"} == {("rds", "tcp", 5432, "k3s")}
    assert {rule for rule in ingress(scaled.scaled("prod")) if rule[0] == "rds"} == {
        ("rds", "tcp", 5432, "k3s"), ("rds", "tcp", 5432, "k3s-agents")}
    assert not [r for r in scaled.rds().of_type("aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule")
                if r.name.startswith("rds")]


def test_the_apps_get_their_database_url_from_rds_over_tls_and_may_reach_the_vpcs_postgresql_port(prod):
    """The NetworkPolicy matrix: on the host the apps reach 172.31.14.98/32:5432; on RDS, whose address
    moves within the VPC, its port 5432 in the VPC (RDS's group admits the nodes only). Nothing else differs."""
    config, _ = effective_config("prod")
    password = config["katforge:dbPassword"]
    assert urlsplit(database_url(prod)).hostname == "172.31.14.98"
    url = database_url(scaled.rds())
    assert url.startswith("postgres://katforge:") and url.endswith(f"@{ADDRESS}:5432/katforge?sslmode=require")
    assert password in url and scaled.rds().named("apps-database").inputs["stringData"] == "[secret]"

    def matrix(plan):
        return {(p.inputs["metadata"]["namespace"], p.inputs["metadata"]["name"],
                 json.dumps(p.inputs["spec"], sort_keys=True))
                for p in plan.of_type("kubernetes:networking.k8s.io/v1:NetworkPolicy")}

    on_host, on_rds = matrix(prod), matrix(scaled.rds())
    changed = {(ns, name) for ns, name, _ in on_host ^ on_rds}
    assert changed == {("default", name) for name in ("api", "web", "lextris", "stumper", "manual-snapshot")}
    for ns, name, spec in on_rds:
        for rule in json.loads(spec).get("egress", []):
            if {"protocol": "TCP", "port": 5432} in rule["ports"]:
                assert rule["to"] == [{"ipBlock": {"cidr": "172.31.0.0/16"}}], name


def test_migrating_makes_rds_and_the_stages_role_there_while_the_apps_stay_on_the_host():
    plan = migrating()
    assert plan.named("rds", RDS) and urlsplit(database_url(plan)).hostname == "172.31.14.98"
    role = plan.named("database-rds-role", COMMAND)
    assert "rds-database.sh" in role.inputs["create"] and "PG_ROLE=katforge" in role.inputs["create"]
    assert f"RDS_ENDPOINT={ADDRESS}" in unwrap(role.raw_inputs["create"])
    assert role.inputs["stdin"] == "[secret]"
    # Still there, and still made first: the host's role and database.
    assert plan.named("database-role", COMMAND)


def test_qa_lives_on_prods_instance_made_on_prods_host():
    qa, prod = scaled.scaled("qa"), scaled.scaled("prod")
    role = qa.named("database-rds-role", COMMAND)
    assert unwrap(role.raw_inputs["connection"])["host"] == prod.raw_outputs["k3sPublicIp"]
    assert "PG_ROLE=katforge_qa" in role.inputs["create"] and "PG_DATABASE=katforge_qa" in role.inputs["create"]
    assert database_url(qa).endswith(f"@{ADDRESS}:5432/katforge_qa?sslmode=require")
    assert not qa.of_type(RDS)  # prod's alone


def test_the_host_gets_libpqs_settings_for_rds_and_the_master_password_in_a_root_only_file():
    plan = scaled.rds()
    env = plan.named("rds-env", COMMAND)
    assert unwrap(env.raw_inputs["stdin"]) == (f"# Written by Pulumi (infra/database.py): libpq's settings for RDS as "
                                                f"its master user.\nPGHOST={ADDRESS}\nPGPORT=5432\nPGUSER=katforge_admin\n"
                                                f"PGSSLMODE=require\nPGPASSFILE=/etc/katforge/rds.pgpass\n")
    assert "0644 /dev/stdin /etc/katforge/rds.env" in env.inputs["create"]
    pgpass = plan.named("rds-pgpass", COMMAND)
    assert pgpass.inputs["stdin"] == "[secret]" and "0600 /dev/stdin /etc/katforge/rds.pgpass" in pgpass.inputs["create"]
    assert unwrap(pgpass.raw_inputs["stdin"]) == f"{ADDRESS}:5432:*:katforge_admin:{scaled.RDS_MASTER_PASSWORD}\n"
    assert database.pgpass("h", 5432, "a:b\\c") == "h:5432:*:katforge_admin:a\\:b\\\\c\n"
    assert scaled.RDS_MASTER_PASSWORD not in plan.to_json()


def test_the_hosts_postgresql_is_stopped_only_when_an_operator_says_so_and_never_deleted(prod):
    assert not [r for r in prod.resources if r.type == "katforge:database:HostPostgresStopped"]
    assert not [r for r in scaled.rds().resources if r.type == "katforge:database:HostPostgresStopped"]
    with pytest.raises(SettingsError, match="hostPostgres = remove: expected keep while katforge:database is host"):
        evaluate("prod", {"katforge:hostPostgres": "remove"})
    plan = evaluate("prod", {**scaled.RDS, "katforge:hostPostgres": "remove"})
    stop = plan.named("host-postgres", COMMAND)
    assert stop.inputs["create"] == "sudo systemctl mask --now postgresql@16-main"
    assert stop.inputs["delete"] == "sudo systemctl unmask postgresql@16-main && sudo systemctl start postgresql@16-main"
    assert plan.named("apps-api", "kubernetes:apps/v1:Deployment").urn in stop.options["depends_on"]  # after the apps
    assert plan.named("database-role", COMMAND)  # the host's role and database stay declared: nothing is dropped


@pytest.mark.parametrize("password, expected", [
    (None, "rdsMasterPassword = (not set): expected the RDS master user's password, set as a secret"),
    ("plain-text-password", "rdsMasterPassword = [plain text, not shown]: expected"),
    (SecretValue("has a space in it"), "rdsMasterPassword = [secret]: expected"),
    (SecretValue("short"), "rdsMasterPassword = [secret]: expected"),
])
def test_the_master_password_is_required_once_rds_is_and_only_as_a_secret(password, expected):
    with pytest.raises(SettingsError) as info:
        evaluate("prod", {"katforge:database": "rds", "katforge:rdsMasterPassword": password})
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert "pulumi config set --secret katforge:rdsMasterPassword --stack prod" in str(info.value) or password
    assert "has a space" not in str(info.value) and "plain-text-password" not in str(info.value)


def test_a_stack_file_secret_undeclared_as_secret_reaches_the_program_as_a_secret(monkeypatch):
    """rdsMasterPassword is not declared `secret: true` (it may stay unset); set with --secret, the CLI hands
    the program a secret all the same, and so does the offline plan."""
    import tools.offline as offline

    def committed(stack, encrypted=None):
        encrypted["katforge:rdsMasterPassword"] = '{"secure": "v1:abc"}'
        return {"katforge:database": "rds"}

    monkeypatch.setattr(offline, "stack_config", committed)
    config, secrets = effective_config("prod")
    assert "katforge:rdsMasterPassword" in secrets
    assert config["katforge:rdsMasterPassword"].startswith("offline-placeholder-rdsMasterPassword-")


# --- rds-database.sh ------------------------------------------------------------------------------

@pytest.fixture
def rds_master(pg, tmp_path):
    """The shared PostgreSQL with a master user like RDS's (no superuser), and the env file Pulumi writes."""
    master = f"admin_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE ROLE {master} LOGIN CREATEDB CREATEROLE PASSWORD 'master-pass-0123'")
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{pg.port}:*:{master}:master-pass-0123\n")
    passfile.chmod(0o600)
    env_file = tmp_path / "rds.env"
    env_file.write_text(f"PGHOST=127.0.0.1\nPGPORT={pg.port}\nPGUSER={master}\nPGSSLMODE=disable\nPGPASSFILE={passfile}\n")
    return master, env_file


def rds_database(pg, env_file, role: str, password: str, endpoint: str = "127.0.0.1") -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(HOST_FILES / "rds-database.sh")], input=password + "\n", capture_output=True,
                          text=True, env={**pg.env(), "PG_ROLE": role, "PG_DATABASE": role, "RDS_ENDPOINT": endpoint,
                                          "RDS_ENV_FILE": str(env_file), "PG_BIN_DIR": str(pg.bin_dir)})


def logs_in(pg, role: str, password: str) -> bool:
    return subprocess.run(["psql", "-X", "-At", "-h", "127.0.0.1", "-U", role, "-d", role, "-c", "SELECT 1"],
                          env={**pg.env(), "PGPASSWORD": password, "PGPASSFILE": "/dev/null"},
                          capture_output=True).returncode == 0


def test_rds_database_makes_the_role_and_database_as_a_master_user_that_is_no_superuser(pg, rds_master):
    master, env_file = rds_master
    role = f"stage_{uuid.uuid4().hex[:8]}"
    made = rds_database(pg, env_file, role, "first-password-0123")
    assert made.returncode == 0, made.stderr
    assert f"set the password of role {role}" in made.stderr and "first-password-0123" not in made.stderr
    assert logs_in(pg, role, "first-password-0123")
    assert pg.psql(f"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{role}'") == role
    assert pg.psql(f"SELECT pg_has_role('{master}', '{role}', 'SET')") == "t"  # the migration restores as the role
    assert pg.psql(f"SELECT has_database_privilege('public', '{role}', 'CONNECT')") == "f"
    assert pg.psql(f"SELECT rolpassword LIKE 'SCRAM-SHA-256$4096:%' FROM pg_authid WHERE rolname = '{role}'") == "t"

    again = rds_database(pg, env_file, role, "first-password-0123")
    assert again.returncode == 0 and "unchanged" in again.stderr and "set the password" not in again.stderr
    rotated = rds_database(pg, env_file, role, "second-password-0123")
    assert rotated.returncode == 0 and "set the password" in rotated.stderr
    assert logs_in(pg, role, "second-password-0123") and not logs_in(pg, role, "first-password-0123")


def test_rds_database_refuses_an_env_file_of_another_instance_and_a_bad_password(pg, rds_master):
    _, env_file = rds_master
    role = f"stage_{uuid.uuid4().hex[:8]}"
    other = rds_database(pg, env_file, role, "a-password-0123", endpoint="katforge-postgres.other.rds.amazonaws.com")
    assert other.returncode == 1 and "not at katforge-postgres.other" in other.stderr
    assert rds_database(pg, env_file, role, "").returncode == 2
    assert pg.psql(f"SELECT count(*) FROM pg_roles WHERE rolname = '{role}'") == "0"


# --- every scaled plan through the estate's checks ------------------------------------------------

PLANS = {"1 agent": lambda: scaled.agents(1), "2 agents": lambda: scaled.agents(2), "rds": scaled.rds,
         "migrating": migrating, "scaled prod": lambda: scaled.scaled("prod"), "scaled qa": lambda: scaled.scaled("qa")}


def changed_kubernetes_objects(plan, default) -> list[dict]:
    """The cluster objects a scaled plan declares otherwise than the default plan (the rest are checked there)."""
    before = {r.urn: unwrap(r.raw_inputs) for r in default.resources if r.type.startswith("kubernetes:")}
    return [unwrap(r.raw_inputs) for r in plan.resources
            if r.type.startswith("kubernetes:") and before.get(r.urn) != unwrap(r.raw_inputs)]


@pytest.mark.parametrize("name", PLANS)
def test_each_scaled_plan_has_a_force_new_row_for_every_type_and_valid_kubernetes_objects(name, request):
    plan = PLANS[name]()
    assert {r.type for r in plan.resources if r.custom} <= set(force_new.TABLE)
    default = request.getfixturevalue(plan.stack)
    for obj in changed_kubernetes_objects(plan, default):
        if (obj["apiVersion"], obj["kind"]) not in CRD_KINDS:
            kubernetes_validate.validate(obj, "1.34.0", strict=True)


@pytest.mark.parametrize("name", PLANS)
def test_each_scaled_plan_keeps_every_invariant_of_the_policy_pack(name):
    plan = PLANS[name]()
    document = plan.document()
    assert [m for policy, check in CHECKS.items() if policy != "stateful-protected"
            for r in document["resources"] for m in check(r, document["stack"])] == []
    assert [m for r in document["resources"] for m in rules.stateful_protected(r["type"], r["options"], r["inputs"])] == []
    assert rules.buckets_encrypted(document["resources"]) == []


@pytest.fixture(scope="module")
def analyzer():
    from pulumi_policy import EnforcementLevel
    from pulumi_policy.policy import _PolicyAnalyzerServicer

    keep_secrets_marked()
    return _PolicyAnalyzerServicer("katforge-estate", "1.0.0", POLICIES, EnforcementLevel.MANDATORY,
                                   None, None, None, None, None, None, None)


@pytest.mark.parametrize("name", ["2 agents", "scaled prod"])
def test_the_pack_itself_passes_the_scaled_plans_and_catches_an_rds_or_agent_that_breaks_it(name, analyzer, monkeypatch):
    monkeypatch.setenv("PULUMI_CONFIG", json.dumps(effective_config("prod")[0]))
    plan = PLANS[name]()
    assert {r.name: found for r in plan.resources if (found := analyze(analyzer, r))} == {}
    for resource in plan.resources:
        if resource.type == RDS:
            for field, value in (("storageEncrypted", False), ("publiclyAccessible", True), ("deletionProtection", False)):
                broken = copy.copy(resource)
                broken.raw_inputs = {**resource.raw_inputs, field: value}
                assert analyze(analyzer, broken), field
        if resource.type == "aws:ec2/instance:Instance" and resource.name.startswith("agent"):
            kept = copy.copy(resource)  # an agent whose disk would outlive it holds state: protect it
            kept.raw_inputs = {**resource.raw_inputs, "rootBlockDevice": {
                **resource.raw_inputs["rootBlockDevice"], "deleteOnTermination": False}}
            assert analyze(analyzer, kept) == ["stateful-protected"]


def test_checkov_finds_nothing_unexplained_in_the_objects_rds_changes(tmp_path, prod, qa):
    binary = checkov()
    objects = changed_kubernetes_objects(scaled.rds(), prod) + changed_kubernetes_objects(scaled.scaled("qa"), qa)
    assert {o["kind"] for o in objects} == {"Secret", "NetworkPolicy", "Deployment"}
    (tmp_path / "rds.yaml").write_text(yaml.safe_dump_all(objects, sort_keys=False))
    done = subprocess.run([binary, "--directory", str(tmp_path), "--framework", "kubernetes", "--output", "json",
                           "--compact", "--skip-download"], capture_output=True, text=True, timeout=300)
    report = json.loads(done.stdout)
    [found] = [r for r in (report if isinstance(report, list) else [report]) if r["check_type"] == "kubernetes"]
    assert found["summary"]["parsing_errors"] == 0 and found["summary"]["passed"] > 0
    assert [f"{f['check_id']} {f['resource']}" for f in found["results"]["failed_checks"]] == []


def test_while_migrating_the_apps_may_reach_rds_and_a_deploy_keeps_the_url_the_tool_wrote():
    """`make migrate-database` points the apps at RDS while the stack still says `migrating`: their policy
    must admit RDS already (else the switched apps reach nothing), and a deploy before `database: rds` is
    committed must not write the host's URL back (the apps would write to the host's stale copy)."""
    def ignored(plan) -> list:
        return plan.named("apps-database", "kubernetes:core/v1:Secret").options.get("ignore_changes") or []

    plan = migrating()
    assert ignored(plan) == ["data", "stringData"]
    to_postgres = [rule["to"] for policy in plan.of_type("kubernetes:networking.k8s.io/v1:NetworkPolicy")
                   for rule in policy.inputs["spec"].get("egress", []) if {"protocol": "TCP", "port": 5432} in rule["ports"]]
    assert to_postgres and all(to == [{"ipBlock": {"cidr": "172.31.0.0/16"}}] for to in to_postgres)
    assert urlsplit(database_url(plan)).hostname == "172.31.14.98"  # until the tool switches them
    # On the host or on RDS, the program owns the URL again.
    assert ignored(scaled.rds()) == [] and ignored(evaluate_cached("prod")) == []

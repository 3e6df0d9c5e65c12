"""The PostgreSQL host scripts, run for real against PostgreSQL 16 (the shared `pg` fixture): the
configuration (pg_hba, listen addresses, memory), each stage's role and database, idempotence, and the
refusal of a broken configuration while the old one keeps serving."""
from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from infra.bootstrap import HOST_FILES, POSTGRES_MEMORY_MIB, postgres_client_cidrs
from infra.settings import STAGES
from tests.pgcluster import SERVER_USER

CONFIGURE = HOST_FILES / "pg-configure.sh"
DATABASE = HOST_FILES / "pg-database.sh"
SETTINGS = HOST_FILES / "postgresql-katforge.conf"
VPC = "172.31.0.0/16"
# The test server listens on 127.0.0.1 only: logins over TCP come from there.
LOOPBACK = "127.0.0.1/32"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the scripts run as root and switch to the postgres OS user")


class Host:
    """The session's server seen as the k3s host: the scripts' environment, and SQL as the postgres OS user."""

    def __init__(self, pg):
        self.pg = pg
        restart = f"runuser -u {SERVER_USER} -- {pg.bin_dir}/pg_ctl -D {pg.conf_dir} restart -w -m fast -l {pg.root}/server.log"
        self.env = pg.env(PG_LISTEN_ADDRESSES="127.0.0.1", PG_RESTART_COMMAND=restart)

    def configure(self, cidrs, settings: str | None = None, **env: str) -> subprocess.CompletedProcess:
        env = dict(self.env, PG_CLIENT_CIDRS=" ".join(cidrs), **env)
        return subprocess.run(["bash", str(CONFIGURE)], input=settings if settings is not None else SETTINGS.read_text(),
                              env=env, capture_output=True, text=True)

    def database(self, stage, password: str) -> subprocess.CompletedProcess:
        env = dict(self.env, PG_ROLE=stage.db_role, PG_DATABASE=stage.database)
        return subprocess.run(["bash", str(DATABASE)], input=password + "\n", env=env, capture_output=True, text=True)

    def sql(self, query: str, database: str = "postgres") -> str:
        # pg_hba now admits the superuser only as the postgres OS user (peer).
        result = subprocess.run(["runuser", "-u", "postgres", "--", str(self.pg.bin_dir / "psql"), "-XAtq",
                                 "-v", "ON_ERROR_STOP=1", "-d", database, "-c", query],
                                env=self.env, capture_output=True, text=True, check=True)
        return result.stdout.strip()

    def login(self, role: str, password: str, database: str,
              query: str = "SELECT current_user") -> subprocess.CompletedProcess:
        """A client over TCP, as a pod would connect; the password travels in the environment."""
        env = dict(self.env, PGPASSWORD=password)
        return subprocess.run([str(self.pg.bin_dir / "psql"), "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", query,
                               f"host=127.0.0.1 port={self.pg.port} user={role} dbname={database}"],
                              env=env, capture_output=True, text=True)


def _ensure_os_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", name], check=True)


@pytest.fixture(scope="module")
def host(pg):
    """Hands the session server to the scripts, then gives it back exactly as the other tests expect it."""
    _ensure_os_user("postgres")  # Ubuntu's package creates it; pg_hba's peer rule names it
    hba = pg.conf_dir / "pg_hba.conf"
    original_hba, hba_mode = hba.read_bytes(), hba.stat().st_mode
    roles_before = set(pg.psql("SELECT rolname FROM pg_roles").split())
    databases_before = set(pg.psql("SELECT datname FROM pg_database").split())
    h = Host(pg)
    yield h
    for stage in STAGES.values():
        if stage.database not in databases_before:
            h.sql(f'DROP DATABASE IF EXISTS "{stage.database}" WITH (FORCE)')
        if stage.db_role not in roles_before:
            h.sql(f'DROP ROLE IF EXISTS "{stage.db_role}"')
    hba.write_bytes(original_hba)
    hba.chmod(hba_mode)
    (pg.conf_dir / "conf.d" / "katforge.conf").unlink(missing_ok=True)
    # A restart reads everything again, including what only a restart applies (shared_buffers).
    pg.pg_ctl("restart", "-w", "-m", "fast", "-l", str(pg.root / "server.log"))


@pytest.fixture(scope="module")
def passwords():
    return {name: f"pw-{secrets.token_urlsafe(12)}" for name in STAGES}


def configure_for_clients(host) -> None:
    """As on the host, but also admitting the loopback address the test clients come from."""
    configured = host.configure([*postgres_client_cidrs(VPC), LOOPBACK])
    assert configured.returncode == 0, configured.stderr


@pytest.fixture(scope="module")
def databases(host, passwords):
    configure_for_clients(host)
    for name, stage in STAGES.items():
        created = host.database(stage, passwords[name])
        assert created.returncode == 0, created.stderr


@pytest.fixture
def serving(host, databases):
    configure_for_clients(host)  # whatever an earlier test left configured
    return host


def hba_rules(host) -> list[str]:
    return host.sql("SELECT concat_ws(' ', type, array_to_string(database, ','), array_to_string(user_name, ','), "
                    "address, netmask, auth_method, error) FROM pg_hba_file_rules ORDER BY rule_number").splitlines()


def test_pg_hba_holds_exactly_the_intended_rules(host):
    result = host.configure(postgres_client_cidrs(VPC))
    assert result.returncode == 0, result.stderr
    assert hba_rules(host) == [
        "local all postgres peer",
        "host all all 10.0.0.0 255.0.0.0 scram-sha-256",
        "host all all 172.16.0.0 255.240.0.0 scram-sha-256",
        "host all all 172.31.0.0 255.255.0.0 scram-sha-256",
    ]
    assert host.sql("SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL") == "0"


def test_the_server_runs_with_the_sized_memory_and_scram(serving):
    live = dict(line.split("=", 1) for line in serving.sql(
        "SELECT name || '=' || current_setting(name) FROM pg_settings WHERE name IN "
        "('shared_buffers', 'work_mem', 'max_connections', 'password_encryption', 'listen_addresses')").splitlines())
    assert live == {"shared_buffers": "256MB", "work_mem": "4MB", "max_connections": "60",
                    "password_encryption": "scram-sha-256", "listen_addresses": "127.0.0.1"}


def test_each_stage_role_logs_in_over_tcp_with_its_password_only(serving, passwords):
    for name, stage in STAGES.items():
        ok = serving.login(stage.db_role, passwords[name], stage.database)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == stage.db_role
        wrong = serving.login(stage.db_role, passwords[name] + "x", stage.database)
        assert wrong.returncode != 0
        assert f'password authentication failed for user "{stage.db_role}"' in wrong.stderr


def test_a_stage_cannot_open_another_stage_database(serving, passwords):
    prod, qa = STAGES["prod"], STAGES["qa"]
    denied = serving.login(qa.db_role, passwords["qa"], prod.database)
    assert denied.returncode != 0
    assert f'permission denied for database "{prod.database}"' in denied.stderr


def snapshot(host) -> dict:
    """Everything a run could change: files, catalog rows (xmin moves on any rewrite), reloads, restarts."""
    files = [host.pg.conf_dir / "pg_hba.conf", host.pg.conf_dir / "conf.d" / "katforge.conf"]
    return {
        "files": {str(f): (f.read_bytes(), f.stat().st_mtime_ns) for f in files},
        "server": host.sql("SELECT pg_conf_load_time(), pg_postmaster_start_time()"),
        "roles": host.sql("SELECT rolname, rolpassword, rolcanlogin, xmin FROM pg_authid "
                          "WHERE rolname LIKE 'katforge%' ORDER BY 1"),
        "databases": host.sql("SELECT datname, datdba, datacl, xmin FROM pg_database ORDER BY 1"),
    }


def test_running_every_script_again_changes_nothing(serving, passwords):
    before = snapshot(serving)
    again = serving.configure([*postgres_client_cidrs(VPC), LOOPBACK])
    assert again.returncode == 0, again.stderr
    assert "configuration unchanged" in again.stderr
    for name, stage in STAGES.items():
        rerun = serving.database(stage, passwords[name])
        assert rerun.returncode == 0, rerun.stderr
        assert rerun.stdout == ""  # it reports each change it makes, and made none
    assert snapshot(serving) == before


def test_a_new_password_replaces_the_old_one(serving, passwords):
    stage = STAGES["qa"]
    changed = serving.database(stage, passwords["qa"] + "-rotated")
    try:
        assert "new password" in changed.stdout
        assert serving.login(stage.db_role, passwords["qa"] + "-rotated", stage.database).returncode == 0
        assert serving.login(stage.db_role, passwords["qa"], stage.database).returncode != 0
    finally:
        serving.database(stage, passwords["qa"])


@pytest.mark.parametrize("cidrs, settings, message", [
    (["10.0.0.0/99", VPC, LOOPBACK], None, 'invalid CIDR mask in address "10.0.0.0/99"'),
    ([VPC, LOOPBACK], SETTINGS.read_text() + "work_mem = lots\n", 'invalid value for parameter "work_mem": "lots"'),
    ([VPC, LOOPBACK], SETTINGS.read_text() + "shared_bufers = 1GB\n", 'unrecognized configuration parameter "shared_bufers"'),
], ids=["bad-hba-address", "bad-setting-value", "unknown-setting"])
def test_a_broken_configuration_is_refused_and_the_old_one_keeps_serving(serving, passwords, cidrs, settings, message):
    before = snapshot(serving)
    rules_before = hba_rules(serving)
    result = serving.configure(cidrs, settings)
    assert result.returncode != 0
    assert "the running configuration is unchanged" in result.stderr
    assert message in result.stderr  # PostgreSQL's own words
    assert snapshot(serving) == before  # same files on disk, no reload, no restart
    assert hba_rules(serving) == rules_before
    stage = STAGES["prod"]
    assert serving.login(stage.db_role, passwords["prod"], stage.database).returncode == 0


# What the apps left behind while they connected as postgres: every kind of object they create, and
# an extension, whose members stay its own.
LEGACY_SCHEMA = """
CREATE EXTENSION vector;
CREATE TABLE players (id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE scores (id bigint GENERATED ALWAYS AS IDENTITY, player int REFERENCES players);
CREATE VIEW player_names AS SELECT name FROM players;
CREATE MATERIALIZED VIEW player_count AS SELECT count(*) FROM players;
CREATE SEQUENCE invoice_numbers;
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE DOMAIN points AS int CHECK (VALUE >= 0);
CREATE FUNCTION shout(text) RETURNS text LANGUAGE sql AS 'SELECT upper($1)';
"""


def public_objects(host, database: str) -> list[tuple[str, ...]]:
    """(name, owner, extension member?, catalog row version) of each object in schema public, array types
    aside (they follow their element type); the row version (xmin) moves on any change."""
    rows = host.sql("SELECT format('%s %s %s %s', name, pg_get_userbyid(owner),"
                    "  EXISTS (SELECT FROM pg_depend WHERE objid = object AND deptype = 'e'), row) FROM ("
                    " SELECT relname, relowner, oid, xmin FROM pg_class WHERE relnamespace = 'public'::regnamespace"
                    " UNION ALL SELECT proname, proowner, oid, xmin FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
                    " UNION ALL SELECT typname, typowner, oid, xmin FROM pg_type t WHERE typnamespace = 'public'::regnamespace"
                    "  AND NOT EXISTS (SELECT FROM pg_type e WHERE e.typarray = t.oid)"
                    ") AS objects (name, owner, object, row) ORDER BY 1", database)
    return [tuple(line.split()) for line in rows.splitlines()]


def test_a_database_the_apps_used_as_postgres_is_handed_over_to_the_stage_role(serving):
    stage = SimpleNamespace(db_role="legacy_app", database="legacy_app")
    password = f"pw-{secrets.token_urlsafe(12)}"
    serving.sql(f'CREATE DATABASE "{stage.database}"')
    try:
        serving.sql(LEGACY_SCHEMA, stage.database)
        adopted = serving.database(stage, password)
        assert adopted.returncode == 0, adopted.stderr
        owners = {(member, owner) for _, owner, member, _ in public_objects(serving, stage.database)}
        assert owners == {("f", stage.db_role), ("t", "postgres")}
        used = serving.login(stage.db_role, password, stage.database,
                             "INSERT INTO players (name) VALUES ('ada') RETURNING id; INSERT INTO scores (player) VALUES (1);"
                             " SELECT shout(name) FROM player_names; REFRESH MATERIALIZED VIEW player_count;"
                             " SELECT nextval('invoice_numbers')")
        assert used.returncode == 0, used.stderr
        assert used.stdout.split() == ["1", "ADA", "1"]

        before = public_objects(serving, stage.database)
        again = serving.database(stage, password)
        assert again.returncode == 0, again.stderr
        assert again.stdout == ""
        assert public_objects(serving, stage.database) == before
    finally:
        serving.sql(f'DROP DATABASE IF EXISTS "{stage.database}" WITH (FORCE)')
        serving.sql(f'DROP ROLE IF EXISTS "{stage.db_role}"')


@pytest.fixture
def psql_failing_on_hba_rules(pg):
    """PG_BIN_DIR for PostgreSQL's programs, except that psql fails when asked about pg_hba_file_rules."""
    bin_dir = Path(tempfile.mkdtemp(prefix="katforge-bin-"))
    bin_dir.chmod(0o755)  # the scripts run the programs as the postgres and server OS users
    (bin_dir / "postgres").write_text(f'#!/usr/bin/env bash\nexec {pg.bin_dir}/postgres "$@"\n')
    (bin_dir / "psql").write_text('#!/usr/bin/env bash\n'
                                  '[[ $* == *pg_hba_file_rules* ]] && { echo "psql: connection lost" >&2; exit 2; }\n'
                                  f'exec {pg.bin_dir}/psql "$@"\n')
    for program in bin_dir.iterdir():
        program.chmod(0o755)
    yield str(bin_dir)
    shutil.rmtree(bin_dir)


@pytest.mark.parametrize("failure", ["server-unreachable", "hba-rules-query-fails"])
def test_a_configuration_that_could_not_be_checked_is_not_applied(serving, psql_failing_on_hba_rules, failure):
    env = {"server-unreachable": {"PGPORT": "1"},  # no server there: SHOW hba_file fails
           "hba-rules-query-fails": {"PG_BIN_DIR": psql_failing_on_hba_rules}}[failure]
    before = snapshot(serving)
    result = serving.configure([*postgres_client_cidrs(VPC), LOOPBACK, "192.168.0.0/16"],
                               SETTINGS.read_text() + "work_mem = 8MB\n", **env)
    assert result.returncode != 0
    assert snapshot(serving) == before  # same files on disk, no reload, no restart


def test_a_password_that_is_not_printable_ascii_is_refused(serving):
    refused = serving.database(STAGES["qa"], "pässwörd")
    assert refused.returncode == 2
    assert "printable ASCII" in refused.stderr


UNITS_MIB = {"kB": 1 / 1024, "MB": 1, "GB": 1024}


def settings_mib() -> dict[str, float]:
    values = {}
    for line in SETTINGS.read_text().splitlines():
        match = re.fullmatch(r"(\w+) = (\d+)(kB|MB|GB)?", line.strip())
        if match:
            name, number, unit = match.groups()
            values[name] = int(number) * UNITS_MIB[unit] if unit else int(number)
    return values


def test_the_worst_case_memory_fits_the_budget_the_capacity_check_counts():
    s = settings_mib()
    backend_overhead_mib = 2  # what an idle backend process costs besides work_mem
    worst = (s["shared_buffers"] + s["max_connections"] * (s["work_mem"] + backend_overhead_mib)
             + s["maintenance_work_mem"] + s["autovacuum_max_workers"] * s["autovacuum_work_mem"])
    assert worst <= POSTGRES_MEMORY_MIB

"""The PostgreSQL host scripts, run for real against PostgreSQL 16. On a fresh cluster of this module: the
configuration (pg_hba, listen addresses, memory), each stage's role and database, idempotence, and the
refusal of a broken configuration while the old one keeps serving. On a second cluster set up like the
live one (Ubuntu's pg_hba plus the operators' md5 lines, an md5 role, a monitoring role, Ubuntu's
memory settings, DDL logged): the first run locks nobody out, restarts only when allowed, and the
database script neither blocks the apps nor logs a password."""
from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from infra.bootstrap import HOST_FILES, POSTGRES_MEMORY_MIB, postgres_client_cidrs
from infra.settings import STAGES
from tests.pgcluster import SERVER_USER, ensure_os_user, running_cluster

CONFIGURE = HOST_FILES / "pg-configure.sh"
DATABASE = HOST_FILES / "pg-database.sh"
SETTINGS = HOST_FILES / "postgresql-katforge.conf"
VPC = "172.31.0.0/16"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the scripts run as root and switch to the postgres OS user")


class Host:
    """The session's server seen as the k3s host: the scripts' environment, and SQL as the postgres OS user."""

    def __init__(self, pg, **env: str):
        self.pg = pg
        restart = f"runuser -u {SERVER_USER} -- {pg.bin_dir}/pg_ctl -D {pg.conf_dir} restart -w -m fast -l {pg.root}/server.log"
        # The test server listens on 127.0.0.1 only: logins over TCP come from there.
        self.env = pg.env(**{"PG_LISTEN_ADDRESSES": "127.0.0.1", "PG_RESTART_COMMAND": restart, "PG_ALLOW_RESTART": "1",
                             "KATFORGE_RESTART_LOCK": str(pg.root / "restart.lock"), **env})

    def configure(self, cidrs, settings: str | None = None, **env: str) -> subprocess.CompletedProcess:
        env = dict(self.env, PG_CLIENT_CIDRS=" ".join(cidrs), **env)
        return subprocess.run(["bash", str(CONFIGURE)], input=settings if settings is not None else SETTINGS.read_text(),
                              env=env, capture_output=True, text=True)

    def database(self, stage, password: str, **env: str) -> subprocess.CompletedProcess:
        env = dict(self.env, PG_ROLE=stage.db_role, PG_DATABASE=stage.database, **env)
        return subprocess.run(["bash", str(DATABASE)], input=password + "\n", env=env, capture_output=True, text=True)

    def sql(self, query: str, database: str = "postgres") -> str:
        # pg_hba now admits the superuser only as the postgres OS user (peer).
        result = subprocess.run(["runuser", "-u", "postgres", "--", str(self.pg.bin_dir / "psql"), "-XAtq",
                                 "-v", "ON_ERROR_STOP=1", "-d", database, "-c", query],
                                env=self.env, capture_output=True, text=True, check=True)
        return result.stdout.strip()

    def login(self, role: str, password: str, database: str,
              query: str = "SELECT current_user", **kwargs) -> subprocess.CompletedProcess:
        """A client over TCP, as a pod would connect; the password travels in the environment."""
        env = dict(self.env, PGPASSWORD=password)
        return subprocess.run([str(self.pg.bin_dir / "psql"), "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", query,
                               f"host=127.0.0.1 port={self.pg.port} user={role} dbname={database}"],
                              env=env, capture_output=True, text=True, **kwargs)


def cluster(prefix: str):
    """A PostgreSQL 16 of this module's own: the scripts rewrite pg_hba and restart the server, which the
    session's shared `pg` (and the roles other modules plant in it) must not see."""
    ensure_os_user("postgres")  # Ubuntu's package creates it; pg_hba's peer rule names it
    return running_cluster(prefix)


# pg_hba.conf as Ubuntu's pg_createcluster writes it for PostgreSQL 16.
UBUNTU_DEFAULT_HBA = """# PostgreSQL Client Authentication Configuration File, as Ubuntu's pg_createcluster writes it
# DO NOT DISABLE!
local   all             postgres                                peer
# TYPE  DATABASE        USER            ADDRESS                 METHOD
local   all             all                                     peer
host    all             all             127.0.0.1/32            scram-sha-256
host    all             all             ::1/128                 scram-sha-256
local   replication     all                                     peer
host    replication     all             127.0.0.1/32            scram-sha-256
host    replication     all             ::1/128                 scram-sha-256
"""


@pytest.fixture(scope="module")
def host():
    """A fresh cluster as Ubuntu sets up the k3s host's (read by the server at the first configure)."""
    with cluster("katforge-host-pg-") as server:
        (server.conf_dir / "pg_hba.conf").write_text(UBUNTU_DEFAULT_HBA)
        yield Host(server)


@pytest.fixture(scope="module")
def passwords():
    return {name: f"pw-{secrets.token_urlsafe(12)}" for name in STAGES}


def configure_for_clients(host) -> None:
    """As on the host; the test clients come from 127.0.0.1, which Ubuntu's lines admit."""
    configured = host.configure(postgres_client_cidrs(VPC))
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


# Ubuntu's defaults, then the client networks with SCRAM, as pg_hba_file_rules shows them.
EXPECTED_RULES = [
    "local all postgres peer",
    "local all all peer",
    "host all all 127.0.0.1 255.255.255.255 scram-sha-256",
    "host all all ::1 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff scram-sha-256",
    "local replication all peer",
    "host replication all 127.0.0.1 255.255.255.255 scram-sha-256",
    "host replication all ::1 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff scram-sha-256",
    "host all all 10.0.0.0 255.0.0.0 scram-sha-256",
    "host all all 172.16.0.0 255.240.0.0 scram-sha-256",
    "host all all 172.31.0.0 255.255.0.0 scram-sha-256",
]


def hba_rules(host) -> list[str]:
    return host.sql("SELECT concat_ws(' ', type, array_to_string(database, ','), array_to_string(user_name, ','), "
                    "address, netmask, auth_method, error) FROM pg_hba_file_rules ORDER BY rule_number").splitlines()


def test_pg_hba_holds_exactly_the_intended_rules(host):
    result = host.configure(postgres_client_cidrs(VPC))
    assert result.returncode == 0, result.stderr
    assert hba_rules(host) == EXPECTED_RULES
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
    again = serving.configure(postgres_client_cidrs(VPC))
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
    (["10.0.0.0/99", VPC], None, 'invalid CIDR mask in address "10.0.0.0/99"'),
    ([VPC], SETTINGS.read_text() + "work_mem = lots\n", 'invalid value for parameter "work_mem": "lots"'),
    ([VPC], SETTINGS.read_text() + "shared_bufers = 1GB\n", 'unrecognized configuration parameter "shared_bufers"'),
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
def psql_failing_on_hba_rules(host):
    """PG_BIN_DIR for PostgreSQL's programs, except that psql fails when asked about pg_hba_file_rules."""
    bin_dir = Path(tempfile.mkdtemp(prefix="katforge-bin-"))
    bin_dir.chmod(0o755)  # the scripts run the programs as the postgres and server OS users
    (bin_dir / "postgres").write_text(f'#!/usr/bin/env bash\nexec {host.pg.bin_dir}/postgres "$@"\n')
    (bin_dir / "psql").write_text('#!/usr/bin/env bash\n'
                                  '[[ $* == *pg_hba_file_rules* ]] && { echo "psql: connection lost" >&2; exit 2; }\n'
                                  f'exec {host.pg.bin_dir}/psql "$@"\n')
    for program in bin_dir.iterdir():
        program.chmod(0o755)
    yield str(bin_dir)
    shutil.rmtree(bin_dir)


@pytest.mark.parametrize("failure", ["server-unreachable", "hba-rules-query-fails"])
def test_a_configuration_that_could_not_be_checked_is_not_applied(serving, psql_failing_on_hba_rules, failure):
    env = {"server-unreachable": {"PGPORT": "1"},  # no server there: SHOW hba_file fails
           "hba-rules-query-fails": {"PG_BIN_DIR": psql_failing_on_hba_rules}}[failure]
    before = snapshot(serving)
    result = serving.configure([*postgres_client_cidrs(VPC), "192.168.0.0/16"],
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


# --- A cluster set up like the live one ------------------------------------------------------------
# The tests below run in file order, as the first `pulumi up` on the live host would: refused while an
# md5 role remains, then applied without the restart it was not allowed, then with it, then again.

OPERATORS_HBA = """# Added by the operators for the pods, the container networks and the VPC (spec: Database).
host    all             all             10.0.0.0/8              md5
host    all             all             172.16.0.0/12           md5
host    all             all             172.31.0.0/16           md5
"""
UBUNTU_HBA = UBUNTU_DEFAULT_HBA + OPERATORS_HBA
# Lines an operator may have added besides, before theirs: another network, a role from anywhere, one that
# `local all all peer` above it already decides (it admits nobody), and part of the VPC for one database.
LIVE_EXTRA_HBA = ("host    all             all             192.168.0.0/16          md5\n"
                  "host    katforge        monitoring      0.0.0.0/0               scram-sha-256\n"
                  "local   all             monitoring                              md5\n"
                  "host    katforge        all             172.31.5.0/24           md5\n")
LIVE_HBA = UBUNTU_DEFAULT_HBA + LIVE_EXTRA_HBA + OPERATORS_HBA
# Ubuntu's postgresql.conf values that katforge.conf changes (two need a restart), and the DDL logging an
# operator may have turned on; all before the include of conf.d, where Ubuntu's file has them.
UBUNTU_SETTINGS = "max_connections = 100\nshared_buffers = 128MB\nwork_mem = 4MB\nlog_statement = 'ddl'\n"


class LiveHost(Host):
    def __init__(self, pg, passwords: dict[str, str]):
        super().__init__(pg, PG_ALLOW_RESTART="0", PG_CLIENT_CIDRS=" ".join(postgres_client_cidrs(VPC)))
        self.passwords = passwords

    def configure(self, cidrs=postgres_client_cidrs(VPC), settings: str | None = None, **env: str):
        return super().configure(cidrs, settings, **env)

    def server(self) -> tuple[str, str]:
        """When the server last read its files, and when it last started."""
        load, start = self.sql("SELECT pg_conf_load_time(), pg_postmaster_start_time()").split("|")
        return load, start


@pytest.fixture(scope="module")
def live():
    passwords = {name: f"pw-{secrets.token_urlsafe(12)}" for name in ("postgres", "legacy", "monitoring", "katforge")}
    with cluster("katforge-live-pg-") as server:
        server.psql(f"""ALTER ROLE postgres PASSWORD '{passwords["postgres"]}';
            SET password_encryption = 'md5';
            CREATE ROLE legacy LOGIN PASSWORD '{passwords["legacy"]}';
            RESET password_encryption;
            CREATE ROLE monitoring LOGIN PASSWORD '{passwords["monitoring"]}' IN ROLE pg_monitor""")
        server.psql("CREATE DATABASE katforge")
        # The apps' tables, created by postgres as the apps connect today.
        server.psql("CREATE TABLE players (id serial PRIMARY KEY, name text);"
                    "INSERT INTO players (name) SELECT 'p' || i FROM generate_series(1, 50) i", database="katforge")
        conf = server.conf_dir / "postgresql.conf"
        conf.write_text(conf.read_text().replace("include_dir = 'conf.d'", UBUNTU_SETTINGS + "include_dir = 'conf.d'"))
        (server.conf_dir / "pg_hba.conf").write_text(UBUNTU_HBA)
        server.pg_ctl("restart", "-w", "-m", "fast", "-l", str(server.root / "server.log"))
        yield LiveHost(server, passwords)


def files(live) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(live.pg.conf_dir.rglob("*")) if path.is_file()}


def test_live_md5_logins_are_refused_before_anything_changes(live):
    before, server = files(live), live.server()
    result = live.configure()
    assert result.returncode == 1
    assert "nothing was changed" in result.stderr
    assert "md5 password hashes" in result.stderr and ": legacy\n" in result.stderr
    assert "SET password_encryption = 'scram-sha-256'" in result.stderr and "\\password legacy" in result.stderr
    assert files(live) == before and live.server() == server


def test_live_rules_the_new_pg_hba_would_not_admit_are_refused_before_anything_changes(live):
    (live.pg.conf_dir / "pg_hba.conf").write_text(LIVE_HBA)
    before, server = files(live), live.server()
    result = live.configure()
    assert result.returncode == 1 and "nothing was changed" in result.stderr
    # Ubuntu's lines and the operators' md5 ones are covered; the line nothing reaches is not listed.
    listed = re.findall(r"pg_hba\.conf line \d+: (.*)$", result.stderr, re.M)
    assert listed == ["host all all 192.168.0.0/16 md5", "host katforge monitoring 0.0.0.0/0 scram-sha-256"]
    assert "katforge:postgresDropLiveHbaRules true" in result.stderr
    assert files(live) == before and live.server() == server


def test_the_first_run_locks_nobody_out_and_asks_for_the_restart_it_may_not_do(live):
    # The fix the refusal gave, with the same password.
    live.sql(f"SET password_encryption = 'scram-sha-256'; ALTER ROLE legacy PASSWORD '{live.passwords['legacy']}'")
    _, started = live.server()
    result = live.configure(PG_DROP_LIVE_HBA_RULES="1")  # the operators' extra lines may go
    assert result.returncode == 1
    assert len(re.findall(r"^pg-configure:   .*pg_hba\.conf line \d+: ", result.stderr, re.M)) == 2  # named as dropped
    assert "max_connections (100 now, 60 after a restart)" in result.stderr
    assert "shared_buffers (128MB now, 256MB after a restart)" in result.stderr
    assert "katforge:postgresAllowRestart true" in result.stderr
    assert live.server()[1] == started  # not restarted
    assert hba_rules(live) == EXPECTED_RULES
    assert (live.pg.conf_dir / "pg_hba.conf.pre-katforge").read_text() == LIVE_HBA
    # Everyone still gets in: postgres over TCP with SCRAM (the backup path) and by peer on the socket,
    # the re-set role, the monitoring role; the reloadable settings are live.
    for role in ("postgres", "legacy", "monitoring"):
        login = live.login(role, live.passwords[role], "katforge")
        assert login.returncode == 0, login.stderr
    assert live.sql("SELECT current_setting('effective_cache_size')") == "1GB"


def test_a_restart_left_waiting_fails_every_run_until_it_is_done(live):
    again = live.configure()
    assert again.returncode == 1
    assert "configuration unchanged" in again.stderr and "max_connections (100 now" in again.stderr


def test_a_restart_waits_for_the_host_restart_lock(live):
    _, started = live.server()
    with open(live.env["KATFORGE_RESTART_LOCK"], "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # k3s-install.sh restarting k3s
        blocked = live.configure(PG_ALLOW_RESTART="1", KATFORGE_RESTART_LOCK_WAIT="0.1")
    assert blocked.returncode == 1
    assert "another restart on this host holds" in blocked.stderr
    assert live.server()[1] == started


def test_an_allowed_restart_applies_and_a_second_run_changes_nothing(live):
    _, started = live.server()
    result = live.configure(PG_ALLOW_RESTART="1")
    assert result.returncode == 0, result.stderr
    assert live.server()[1] != started
    assert live.sql("SELECT current_setting('max_connections'), current_setting('shared_buffers')") == "60|256MB"
    before, server = files(live), live.server()
    again = live.configure()
    assert again.returncode == 0, again.stderr
    assert again.stderr == "pg-configure: configuration unchanged\n"
    assert files(live) == before and live.server() == server


def test_a_setting_overridden_by_a_later_file_is_named(live):
    live.sql("ALTER SYSTEM SET work_mem = '8MB'")
    live.sql("SELECT pg_reload_conf()")
    try:
        result = live.configure()
        assert result.returncode == 1
        assert re.search(r"overridden: work_mem from \S+/postgresql\.auto\.conf line \d+", result.stderr), result.stderr
    finally:
        live.sql("ALTER SYSTEM RESET work_mem")
        live.sql("SELECT pg_reload_conf()")


@pytest.fixture(scope="module")
def adopted_database(live):
    """prod's role and database on the live cluster: the database postgres created, taken over."""
    log = live.pg.root / "server.log"
    offset = log.stat().st_size
    result = live.database(STAGES["prod"], live.passwords["katforge"])
    assert result.returncode == 0, result.stderr
    return result, log.read_text()[offset:]


def test_the_password_never_reaches_the_server_log(live, adopted_database):
    _, logged = adopted_database
    assert "statement: ALTER DATABASE" in logged and "statement: ALTER TABLE players" in logged  # DDL is logged
    assert "SCRAM-SHA-256$" not in logged and live.passwords["katforge"] not in logged
    login = live.login("katforge", live.passwords["katforge"], "katforge", "SELECT count(*) FROM players")
    assert login.returncode == 0 and login.stdout.strip() == "50"


def test_roles_that_lose_connect_are_listed(live, adopted_database):
    result, _ = adopted_database
    assert "could connect to katforge through PUBLIC and no longer can: legacy monitoring" in result.stdout
    assert 'GRANT CONNECT ON DATABASE "katforge" TO <role>' in result.stdout


def app_query(live, timeout: float) -> float:
    """An app's query on the table, as postgres over TCP; how long it took."""
    began = time.monotonic()
    done = live.login("postgres", live.passwords["postgres"], "lockapp", "SELECT count(*) FROM scores", timeout=timeout)
    assert done.returncode == 0, done.stderr
    return time.monotonic() - began


def start_database(live, root: Path, retries: int) -> subprocess.Popen:
    """pg-database.sh in the background, with short lock timeouts; its output goes to files in root."""
    (root / "password").write_text("pw-lockapp-1\n")
    env = dict(live.env, PG_ROLE="lockapp", PG_DATABASE="lockapp", PG_LOCK_TIMEOUT="200ms",
               PG_LOCK_RETRY_DELAY="0.2", PG_LOCK_RETRIES=str(retries))
    with open(root / "password") as stdin, open(root / "out", "w") as out, open(root / "err", "w") as err:
        return subprocess.Popen(["bash", str(DATABASE)], stdin=stdin, stdout=out, stderr=err, env=env)


def test_a_change_of_owner_waits_for_readers_without_blocking_the_apps(live, tmp_path):
    stage = SimpleNamespace(db_role="lockapp", database="lockapp")
    live.sql("CREATE DATABASE lockapp")
    live.sql("CREATE TABLE scores (id int); INSERT INTO scores VALUES (1)", "lockapp")
    # A report that keeps its transaction open on the table.
    reader = subprocess.Popen(["runuser", "-u", "postgres", "--", str(live.pg.bin_dir / "psql"), "-XAtq", "-d", "lockapp"],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                              env=dict(live.env, PGAPPNAME="nightly-report"))
    script = None
    try:
        reader.stdin.write("BEGIN;\nSELECT count(*) FROM scores;\n")
        reader.stdin.flush()
        while live.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'nightly-report'"
                       " AND state = 'idle in transaction'") != "1":
            time.sleep(0.05)
        script = start_database(live, tmp_path, retries=4)
        deadline = time.monotonic() + 10
        while live.sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                       " AND query LIKE 'ALTER TABLE%scores%'") != "1":
            assert time.monotonic() < deadline, "the change of owner never waited for the report"
            time.sleep(0.02)
        # While it waits, the apps' queries queue behind it: each for one lock timeout at most.
        slowest = max(app_query(live, timeout=5) for _ in range(8))
        assert slowest < 1.0
        assert script.wait(timeout=30) == 1
        err = (tmp_path / "err").read_text()
        assert "within 4 tries of 200ms" in err
        assert re.search(r"scores: pid \d+, user postgres, application nightly-report, idle in transaction", err), err
        assert live.sql("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'scores'", "lockapp") == "postgres"

        # Tried again, it succeeds once the report ends.
        script = start_database(live, tmp_path, retries=50)
        time.sleep(0.5)
        reader.stdin.write("COMMIT;\n")
        reader.stdin.flush()
        assert script.wait(timeout=30) == 0, (tmp_path / "err").read_text()
        assert "table scores now owned by lockapp" in (tmp_path / "out").read_text()
    finally:
        if script is not None and script.poll() is None:
            script.kill()
        reader.stdin.close()
        reader.wait(timeout=10)
        live.sql("DROP DATABASE IF EXISTS lockapp WITH (FORCE)")
        live.sql("DROP ROLE IF EXISTS lockapp")

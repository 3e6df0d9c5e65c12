"""`make migrate-database`, its host part run for real: two PostgreSQL 16 clusters stand in for the k3s
host's (the shared `pg`) and RDS (a cluster of its own, whose master user is, as on RDS, no superuser:
CREATEROLE and CREATEDB only), with the stage's role and database made on "RDS" by the real
infra/host/rds-database.sh, the real backup tooling (infra/host/backup-databases.sh) writing to moto's S3
with the host's writer policy (tests/s3_sandbox.py), and real kubectl against the Kubernetes test server
(tests/test_restore.py's Cluster), where the apps' pods are psql sessions on the host's database that end
when their Deployment is scaled to 0.

The database is realistic but small: two schemas, foreign keys, btree and GIN indexes, sequences, a view
and a materialized view, a plpgsql function and trigger, jsonb, bytea, numeric, timestamptz, TOASTed
text, and grants to a second role; one test adds an extension a superuser made (pgvector) and a table using it."""
from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.pgcluster import running_cluster
from tests.s3_sandbox import BACKUP, HOST, RUN_AS, Backups
from tests.test_restore import Cluster, checksums, session, wait_for
from tools import migrate_database as tool

pytest_plugins = ["tests.s3_sandbox"]

MASTER = "katforge_admin"
MASTER_PASSWORD = "rds-master-password-0123"
ROLE_PASSWORD = "p@ss/w:rd?#stage-0123"
READER = "katforge_reader"

SEED = """
CREATE SCHEMA game AUTHORIZATION {role};
CREATE SCHEMA shop AUTHORIZATION {role};
SET ROLE {role};
CREATE TABLE game.players (id bigserial PRIMARY KEY, name text NOT NULL UNIQUE, profile jsonb NOT NULL,
                           avatar bytea, bio text, joined timestamptz NOT NULL);
CREATE INDEX players_profile ON game.players USING gin (profile);
CREATE TABLE game.scores (id bigserial PRIMARY KEY, player_id bigint NOT NULL REFERENCES game.players,
                          score numeric(12, 3), at timestamptz NOT NULL);
CREATE INDEX scores_player ON game.scores (player_id, at DESC);
CREATE FUNCTION game.touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.joined := now(); RETURN NEW; END $$;
CREATE TRIGGER players_touch BEFORE UPDATE ON game.players FOR EACH ROW EXECUTE FUNCTION game.touch();
CREATE SEQUENCE shop.order_number START 1000;
CREATE TABLE shop.orders (id bigint PRIMARY KEY DEFAULT nextval('shop.order_number'),
                          player_id bigint REFERENCES game.players, items jsonb, total numeric(10, 2));
CREATE VIEW game.leaders AS
  SELECT p.name, max(s.score) AS best FROM game.players p JOIN game.scores s ON s.player_id = p.id GROUP BY p.name;
INSERT INTO game.players (name, profile, avatar, bio, joined)
SELECT 'player ' || i, jsonb_build_object('level', i % 40, 'tags', jsonb_build_array('t' || i % 7)),
       decode(md5(i::text), 'hex'), (SELECT string_agg(md5(i::text || '.' || j), '') FROM generate_series(1, 80) j),
       timestamptz '2025-01-01 00:00+00' + i * interval '1 minute'
FROM generate_series(1, 400) i;
INSERT INTO game.scores (player_id, score, at)
SELECT 1 + i % 400, i * 1.5, timestamptz '2025-01-01 00:00+00' + i * interval '1 hour' FROM generate_series(1, 4000) i;
INSERT INTO shop.orders (player_id, items, total)
SELECT 1 + i % 400, jsonb_build_array(jsonb_build_object('sku', i % 13)), i % 97 + 0.99 FROM generate_series(1, 600) i;
CREATE MATERIALIZED VIEW shop.revenue AS SELECT player_id, sum(total) AS total FROM shop.orders GROUP BY player_id;
GRANT USAGE ON SCHEMA game TO {reader};
GRANT SELECT ON game.leaders TO {reader};
COMMENT ON TABLE game.players IS 'one row a player';
RESET ROLE;
"""


@pytest.fixture(scope="module")
def rds():
    """The RDS stand-in: its own cluster, a master user with RDS's powers over roles and databases only."""
    with running_cluster("katforge-rds-") as cluster:
        cluster.psql(f"CREATE ROLE {MASTER} LOGIN CREATEDB CREATEROLE PASSWORD '{MASTER_PASSWORD}'")
        cluster.psql(f"CREATE ROLE {READER} NOLOGIN")
        yield cluster


class Stage:
    """One stage's database on the host, its (empty) role and database on RDS as Pulumi leaves them, its
    apps' Secret in the cluster, and the environment the tool runs with on the host."""

    def __init__(self, pg, rds, backups: Backups, cluster: Cluster, work: Path):
        self.pg, self.rds, self.backups, self.cluster = pg, rds, backups, cluster
        self.database = self.role = f"katforge_{uuid.uuid4().hex[:8]}"
        self.facts = tool.StageFacts("prod", "default", self.database, self.role)
        pg.psql(f"CREATE ROLE {self.role} LOGIN PASSWORD '{ROLE_PASSWORD}'")
        pg.psql(f"DO $$ BEGIN CREATE ROLE {READER} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
        pg.psql(f"CREATE DATABASE {self.database} OWNER {self.role}")
        pg.psql(SEED.format(role=self.role, reader=READER), database=self.database)
        passfile = work / "rds.pgpass"
        passfile.write_text(f"127.0.0.1:{rds.port}:*:{MASTER}:{MASTER_PASSWORD}\n")
        passfile.chmod(0o600)
        self.env_file = work / "rds.env"
        # As Pulumi writes it (infra/database.py), but without TLS: the stand-in has no certificate.
        self.env_file.write_text(f"PGHOST=127.0.0.1\nPGPORT={rds.port}\nPGUSER={MASTER}\nPGSSLMODE=disable\n"
                                 f"PGPASSFILE={passfile}\n")
        made = subprocess.run(["bash", str(HOST / "rds-database.sh")], input=ROLE_PASSWORD + "\n", capture_output=True,
                              text=True, env={**rds.env(), "PG_ROLE": self.role, "PG_DATABASE": self.database,
                                              "RDS_ENDPOINT": "127.0.0.1", "RDS_ENV_FILE": str(self.env_file),
                                              "PG_BIN_DIR": str(rds.bin_dir)})
        assert made.returncode == 0, made.stderr
        url = f"postgres://{self.role}:p%40ss%2Fw%3Ard%3F%23stage-0123@172.31.14.98:5432/{self.database}"
        cluster.api.add({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                         "metadata": {"name": "database", "namespace": "default"},
                         "data": {"DATABASE_URL": base64.b64encode(url.encode()).decode()}})
        # The apps hold sessions on the host's database, which end when their Deployment is scaled to 0.
        for app in ("api", "web"):
            cluster.pods[("default", app)] = [session(pg, self.database, "SELECT 1", PGAPPNAME=app)]
        wait_for(lambda: self.sessions() == 2, "the apps' sessions")
        self.host_env = {**backups.env(backups.writer), **cluster.env(), "RDS_ENV_FILE": str(self.env_file),
                         "MIGRATE_RUN_AS": RUN_AS, "BACKUP_RUN_AS": RUN_AS, "BACKUP_COMMAND": f"bash {BACKUP}",
                         "BACKUP_LOCK": str(work / "backup.lock"), "KATFORGE_LIB_DIR": str(HOST),
                         "MIGRATE_SESSION_WAIT": "10"}

    def sessions(self) -> int:
        return int(self.pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{self.database}' "
                                "AND backend_type = 'client backend'"))

    def migrate(self, **env: str) -> tool.Migration:
        return tool.Migration(self.facts, tool.Host({**self.host_env, **env}))

    def secret_url(self) -> str:
        secret = self.cluster.api.get("v1", "Secret", "database", "default")
        return base64.b64decode(secret["data"]["DATABASE_URL"]).decode()

    def rds_psql(self, sql: str, database: str = "postgres") -> str:
        return self.rds.psql(sql, database=database)


@pytest.fixture
def stage(pg, rds, s3, tmp_path):
    cluster = Cluster(tmp_path)
    yield Stage(pg, rds, Backups(s3, pg, tmp_path), cluster, tmp_path)
    cluster.stop()


def test_the_migration_moves_the_database_with_matching_checksums_and_measures_the_downtime(stage, pg, rds):
    before_replicas = stage.cluster.replicas("default")
    host_checksums = checksums(pg, stage.database)
    migration = stage.migrate()
    report = migration.run()
    assert not migration.work.exists()  # no copy of the data left behind on the host

    # The copy on RDS has every row: the tool compared it with the dump's manifest, and here it is compared
    # with the host's database independently.
    assert checksums(rds, stage.database) == host_checksums
    assert report["relations"] == len(host_checksums) and report["bytes"] > 100_000
    # The stage's role owns every object, as on the host; the grants to the reader came along.
    owners = rds.psql("SELECT string_agg(DISTINCT pg_get_userbyid(relowner), ',') FROM pg_class c JOIN pg_namespace n "
                      "ON n.oid = c.relnamespace WHERE nspname IN ('game', 'shop')", database=stage.database)
    assert owners == stage.role
    assert rds.psql(f"SELECT has_table_privilege('{READER}', 'game.leaders', 'SELECT')", database=stage.database) == "t"
    assert rds.psql("SELECT ispopulated FROM pg_matviews WHERE matviewname = 'revenue'", database=stage.database) == "t"
    assert rds.psql("SELECT obj_description('game.players'::regclass)", database=stage.database) == "one row a player"
    # The verified copy took the database's name; nothing is left beside it; only the role may connect.
    assert rds.psql(f"SELECT string_agg(datname, ' ') FROM pg_database WHERE datname LIKE '{stage.database}%'") \
        == stage.database
    assert rds.psql(f"SELECT has_database_privilege('{READER}', '{stage.database}', 'CONNECT')") == "f"

    # The apps' DATABASE_URL: RDS, with the same role, password and database, as the program writes it.
    url = stage.secret_url()
    assert url == (f"postgres://{stage.role}:p%40ss%2Fw%3Ard%3F%23stage-0123@127.0.0.1:{rds.port}/{stage.database}"
                   "?sslmode=require")
    parts = urlsplit(url)
    logged_in = subprocess.run(["psql", "-X", "-At", "-d", f"host={parts.hostname} port={parts.port} "
                                f"dbname={parts.path[1:]} user={stage.role} sslmode=disable", "-c",
                                "SELECT count(*) FROM game.players"],
                               env={**rds.env(), "PGPASSWORD": ROLE_PASSWORD, "PGPASSFILE": "/dev/null"},
                               capture_output=True, text=True)
    assert logged_in.stdout.strip() == "400", logged_in.stderr

    # The apps were stopped for the switch and came back as they were; the host's database is untouched.
    assert stage.cluster.replicas("default") == before_replicas
    assert checksums(pg, stage.database) == host_checksums
    seconds = report["seconds"]
    assert seconds["downtime"] >= seconds["dump"] + seconds["restore"] + seconds["verify"] > 0
    assert json.loads(json.dumps(report)) == report  # the report is JSON, as --report writes it


# pgserver's PostgreSQL 16 ships no contrib (no citext, pg_trgm or hstore, the trusted ones): its one
# extension besides plpgsql is pgvector, which RDS lets its master user (rds_superuser) create but which is
# untrusted, so PostgreSQL lets only a superuser create it. The stand-in's master user is made one for
# this test alone: the stage's role, which restores everything else, still may not.
EXTENSION_SEED = """
CREATE EXTENSION vector;
SET ROLE {role};
CREATE TABLE game.looks (player_id bigint PRIMARY KEY REFERENCES game.players, style vector(3) NOT NULL);
INSERT INTO game.looks SELECT i, format('[%s,%s,%s]', i % 5, i % 7, i % 11)::vector FROM generate_series(1, 400) i;
RESET ROLE;
"""


def test_an_extension_a_dba_made_on_the_host_is_made_on_rds_by_the_master_user(stage, pg, rds):
    pg.psql(EXTENSION_SEED.format(role=stage.role), database=stage.database)
    host_checksums = checksums(pg, stage.database)
    rds.psql(f"ALTER ROLE {MASTER} SUPERUSER")
    migration = stage.migrate()
    try:
        migration.run()
    finally:
        rds.psql(f"ALTER ROLE {MASTER} NOSUPERUSER")
    assert checksums(rds, stage.database) == host_checksums
    assert rds.psql("SELECT extowner::regrole FROM pg_extension WHERE extname = 'vector'", database=stage.database) \
        == MASTER
    assert rds.psql("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'game.looks'::regclass",
                    database=stage.database) == stage.role
    nearest = "SELECT player_id FROM game.looks ORDER BY style <-> '[4,6,10]' LIMIT 1"
    assert rds.psql(nearest, database=stage.database) == pg.psql(nearest, database=stage.database) == "384"


# The backup, and then a changed checksum in its manifest: what a copy that differs from its dump looks like.
TAMPER = """
import json, os, re, subprocess, sys
import boto3
done = subprocess.run(["bash", sys.argv[1], *sys.argv[2:]], stderr=subprocess.PIPE, text=True)
sys.stderr.write(done.stderr)
key = re.search(r"ok (\\S+)\\.dump ", done.stderr).group(1) + ".manifest.json"
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], **json.loads(os.environ["TAMPER_ADMIN"]))
manifest = json.loads(s3.get_object(Bucket=os.environ["BACKUP_BUCKET"], Key=key)["Body"].read())
for relation in manifest["relations"]:
    if relation.get("table") == "game.scores":
        relation["checksum"] = "1"
s3.put_object(Bucket=os.environ["BACKUP_BUCKET"], Key=key, Body=json.dumps(manifest).encode())
sys.exit(done.returncode)
"""


def test_a_copy_that_differs_from_the_dump_is_dropped_and_the_apps_come_back_on_the_host(stage, rds, tmp_path):
    """The dump's manifest and the copy on RDS disagree (here: one checksum of the manifest is changed
    between the backup and the download): nothing is switched."""
    script = tmp_path / "tamper.py"
    script.write_text(TAMPER)
    admin = stage.backups.s3.admin
    stage.host_env.update(BACKUP_COMMAND=f"{sys.executable} {script} {BACKUP}", TAMPER_ADMIN=json.dumps(
        {"aws_access_key_id": admin["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": admin["AWS_SECRET_ACCESS_KEY"],
         "region_name": "us-east-2"}))
    before = stage.cluster.replicas("default")
    url = stage.secret_url()
    migration = stage.migrate()
    with pytest.raises(tool.MigrationError, match=r"differs from the dump.*\n  table game.scores: 4000 rows"):
        migration.run()
    assert stage.secret_url() == url and stage.cluster.replicas("default") == before
    assert not migration.work.exists()  # a failed migration leaves no copy of the data behind either
    assert rds.psql(f"SELECT string_agg(datname, ' ') FROM pg_database WHERE datname LIKE '{stage.database}%'") \
        == stage.database
    assert rds.psql("SELECT count(*) FROM pg_class WHERE relname = 'players'", database=stage.database) == "0"


def test_a_session_that_outlives_the_apps_stops_the_migration_before_the_dump(stage, pg, rds):
    idle = session(pg, stage.database, "BEGIN", "SELECT 1", PGAPPNAME="someones-psql")
    try:
        wait_for(lambda: stage.sessions() == 3, "the session")
        with pytest.raises(tool.MigrationError, match="(?s)still has sessions .*application someones-psql"):
            stage.migrate(MIGRATE_SESSION_WAIT="1").run()
    finally:
        idle.communicate("ROLLBACK;\n", timeout=10)
    assert set(stage.cluster.replicas("default").values()) == {1}
    assert stage.backups.dumps(stage.database) == []  # nothing was dumped
    assert "127.0.0.1" not in stage.secret_url()


def test_a_role_rds_lacks_or_a_database_in_use_is_refused_before_the_apps_stop(stage, pg, rds):
    pg.psql("CREATE ROLE katforge_auditor NOLOGIN")
    pg.psql("GRANT SELECT ON shop.orders TO katforge_auditor", database=stage.database)
    with pytest.raises(tool.MigrationError, match="names roles RDS does not have: katforge_auditor"):
        stage.migrate().run()
    pg.psql("REVOKE ALL ON shop.orders FROM katforge_auditor", database=stage.database)
    rds.psql("CREATE TABLE leftover (id int)", database=stage.database)
    with pytest.raises(tool.MigrationError, match="holds objects already"):
        stage.migrate().run()
    assert stage.sessions() == 2 and [r for r in stage.cluster.api.requests if r.startswith("PATCH")] == []


def test_the_comparison_lets_sequences_run_ahead_never_behind():
    manifest = {"relations": [{"table": "a.t", "rows": 2, "checksum": "9"}, {"sequence": "a.s", "value": 10}]}
    same = [{"table": "a.t", "rows": 2, "checksum": "9"}, {"sequence": "a.s", "value": 12}]
    assert tool.compare(manifest, same) == []
    assert tool.compare(manifest, [same[0], {"sequence": "a.s", "value": 9}]) == [
        "sequence a.s is at 9 on RDS, behind the dump's 10"]
    assert tool.compare(manifest, [same[1], {"table": "a.x", "rows": 0, "checksum": "0"}]) == [
        "table a.t is missing on RDS", "table a.x is on RDS but not in the dump"]


def test_the_operator_part_runs_the_tool_on_the_host_only_once_the_stage_is_migrating(monkeypatch, capsys):
    import tools.offline

    monkeypatch.setattr(tools.offline, "stack_config", lambda stack: {"katforge:database": "host"})
    assert tool.main(["--stage", "qa"]) == 2
    assert "says katforge:database host: set it to migrating" in capsys.readouterr().err
    monkeypatch.setattr(tools.offline, "stack_config", lambda stack: {"katforge:database": "migrating"})
    ran = []
    monkeypatch.setattr(tool.subprocess, "run", lambda args, stdin: ran.append((args, stdin.read())) or
                        subprocess.CompletedProcess(args, 0))
    assert tool.main(["--stage", "qa", "--ssh", "ubuntu@k3s.example"]) == 0
    [(args, program)] = ran
    assert args == ["ssh", "ubuntu@k3s.example", "sudo python3 - --here --stage qa --namespace qa --database katforge_qa "
                                                  "--role katforge_qa"]
    assert program == Path(tool.__file__).read_text()


def test_the_help_says_what_the_tool_does_whole_and_what_every_option_is(capsys):
    with pytest.raises(SystemExit) as exited:
        tool.main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: make migrate-database ")
    words = " ".join(text.split())
    first_paragraph = " ".join(tool.__doc__.split("\n\n")[0].split())
    assert first_paragraph.endswith("that time measured.") and first_paragraph in words
    options = text.split("\noptions:\n", 1)[1]
    entries = re.split(r"\n  (?=-)", options.strip())
    assert len(entries) == 8  # -h and the seven options
    for entry in entries:
        # The entry without its option names and metavar: the option's help.
        assert re.sub(r"^(?:-[-\w]+(?: [A-Z_]+)?(?:, )?)+", "", entry).strip(), entry


def test_the_tool_needs_only_pythons_standard_library_on_the_host():
    """The host runs it from stdin with Ubuntu's python3: no import of this repository or of a package."""
    source = Path(tool.__file__).read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines()
               if line.startswith(("import ", "from ")) and not line.startswith("from __future__")}
    assert imports <= set(sys.stdlib_module_names)

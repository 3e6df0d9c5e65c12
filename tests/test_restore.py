"""The restore script, run for real as the runbook runs it (a superuser; on the host root, with
PostgreSQL's programs as the postgres OS user): PostgreSQL 16 (the shared `pg` fixture), moto's S3 with
the operators' read-only policy (tests/s3_sandbox.py), and real kubectl against the Kubernetes test
server (tests/kube_api.py, over TLS, with the discovery kubectl needs). The database restored is like
the drill's, small: three schemas, GIN and btree indexes, sequences, a view and a materialized view,
plpgsql functions and triggers, jsonb, bytea, TOASTed text, the vector extension (untrusted, as
pgvector's control file has no `trusted`: only a superuser creates it) owned by postgres, a schema and
a table with its index owned by a DBA, and database settings, a comment and an ACL of its own.

Each of the drill's findings about restores is a test here; each failed against the scripts before
this change (noted in the test)."""
from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import secrets
import ssl
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import trustme
import yaml

from tests.kube_api import KINDS, Reply, live_estate, serve
from tests.s3_sandbox import HOST, RUN_AS, STAGE, Backups, timestamp_of

pytest_plugins = ["tests.s3_sandbox"]

CHECKSUMS = HOST / "table-checksums.sql"

# {stage}: the stage's role, owner of the database; {dba}: a DBA's role.
DRILL_SEED = """
CREATE EXTENSION vector;
CREATE SCHEMA game AUTHORIZATION {stage};
CREATE SCHEMA shop AUTHORIZATION {stage};
CREATE SCHEMA audit AUTHORIZATION {dba};
GRANT CREATE, USAGE ON SCHEMA game TO {dba};
SET ROLE {stage};
CREATE TABLE game.players (
  id bigserial PRIMARY KEY, name text NOT NULL, profile jsonb NOT NULL, avatar bytea, bio text,
  embedding vector(3), updated timestamptz);
CREATE INDEX players_profile ON game.players USING gin (profile);
CREATE INDEX players_name ON game.players (name);
CREATE TABLE game.scores (id bigserial PRIMARY KEY, player_id bigint NOT NULL REFERENCES game.players,
                          score numeric(12, 3), at timestamptz NOT NULL);
CREATE INDEX scores_player ON game.scores (player_id, at DESC);
CREATE FUNCTION game.touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.updated := now(); RETURN NEW; END $$;
CREATE TRIGGER players_touch BEFORE UPDATE ON game.players FOR EACH ROW EXECUTE FUNCTION game.touch();
CREATE SEQUENCE shop.order_number START 1000;
CREATE TABLE shop.orders (id bigint PRIMARY KEY DEFAULT nextval('shop.order_number'),
                          player_id bigint REFERENCES game.players, items jsonb, total numeric(10, 2));
CREATE VIEW game.leaders AS
  SELECT p.name, max(s.score) AS best FROM game.players p JOIN game.scores s ON s.player_id = p.id GROUP BY p.name;
INSERT INTO game.players (name, profile, avatar, bio, embedding)
SELECT 'player ' || i, jsonb_build_object('level', i % 40, 'tags', jsonb_build_array('t' || i % 7, 'x')),
       decode(md5(i::text), 'hex'),
       (SELECT string_agg(md5(i::text || '.' || j), '') FROM generate_series(1, 80) j),  -- 2.5 kB: TOASTed
       format('[%s,%s,%s]', i, i / 2.0, -i)::vector
FROM generate_series(1, 200) i;
INSERT INTO game.scores (player_id, score, at)
SELECT 1 + i % 200, i * 1.5, timestamptz '2025-01-01 00:00+00' + i * interval '1 hour' FROM generate_series(1, 1000) i;
INSERT INTO shop.orders (player_id, items, total)
SELECT 1 + i % 200, jsonb_build_array(jsonb_build_object('sku', i % 13)), i % 97 + 0.99 FROM generate_series(1, 300) i;
CREATE MATERIALIZED VIEW shop.revenue AS SELECT player_id, sum(total) AS total FROM shop.orders GROUP BY player_id;
GRANT SELECT ON game.players TO {dba};
RESET ROLE;
SET ROLE {dba};
CREATE TABLE audit.events (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), what text);
CREATE INDEX events_at ON audit.events (at);
CREATE FUNCTION audit.record() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN INSERT INTO audit.events (what) VALUES (TG_TABLE_NAME || ' ' || TG_OP); RETURN NEW; END $$;
CREATE TABLE game.reports (id serial PRIMARY KEY, body text);
CREATE INDEX reports_body ON game.reports (body);
INSERT INTO game.reports (body) VALUES ('weekly'), ('monthly');
GRANT USAGE ON SCHEMA audit TO {stage};
RESET ROLE;
CREATE TRIGGER scores_audit AFTER INSERT ON game.scores FOR EACH ROW EXECUTE FUNCTION audit.record();
INSERT INTO game.scores (player_id, score, at) VALUES (1, 1, now());
"""


def database_properties_sql(database: str, stage: str, dba: str) -> str:
    return (f"ALTER DATABASE {database} SET search_path = game, public, \"$user\";"
            f"ALTER DATABASE {database} SET work_mem = '16MB';"
            f"ALTER ROLE {dba} IN DATABASE {database} SET statement_timeout = '5min';"
            f"COMMENT ON DATABASE {database} IS 'the stage''s data';"
            f"REVOKE CONNECT ON DATABASE {database} FROM PUBLIC; GRANT CONNECT ON DATABASE {database} TO {dba};")


# What a restore must bring back besides the rows: each object with its owner and privileges, the
# database's own properties. Names only, no OIDs, so two databases compare.
SHAPE_SQL = """
SELECT json_build_object(
  'relations', (SELECT json_agg(format('%s %s %s %s', c.oid::regclass, c.relkind, pg_get_userbyid(c.relowner), c.relacl)
                                ORDER BY c.oid::regclass::text)
                  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%'),
  'indexes', (SELECT json_agg(pg_get_indexdef(indexrelid) ORDER BY pg_get_indexdef(indexrelid)) FROM pg_index
               WHERE indrelid::regclass::text NOT LIKE 'pg\\_%' AND indrelid::regclass::text NOT LIKE 'information_schema.%'),
  'schemas', (SELECT json_agg(format('%s %s %s', nspname, pg_get_userbyid(nspowner), nspacl) ORDER BY nspname)
                FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'),
  'functions', (SELECT json_agg(format('%s %s %s %s', p.oid::regprocedure, pg_get_userbyid(p.proowner), p.prosecdef, p.proacl)
                                ORDER BY p.oid::regprocedure::text)
                  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                 WHERE n.nspname IN ('game', 'shop', 'audit')),
  'triggers', (SELECT json_agg(format('%s %s %s', tgname, tgrelid::regclass, tgfoid::regproc) ORDER BY tgname)
                 FROM pg_trigger WHERE NOT tgisinternal),
  'extensions', (SELECT json_agg(format('%s %s %s', extname, pg_get_userbyid(extowner), extnamespace::regnamespace)
                                 ORDER BY extname) FROM pg_extension),
  'matviews', (SELECT json_agg(format('%s %s', matviewname, ispopulated) ORDER BY matviewname) FROM pg_matviews),
  'database', (SELECT json_build_object(
                 'owner', pg_get_userbyid(datdba), 'acl', datacl, 'encoding', pg_encoding_to_char(encoding),
                 'collate', datcollate, 'comment', shobj_description(d.oid, 'pg_database'),
                 'settings', (SELECT json_agg(format('%s %s', pg_get_userbyid(setrole), setconfig) ORDER BY setrole)
                                FROM pg_db_role_setting WHERE setdatabase = d.oid))
                 FROM pg_database d WHERE datname = current_database()))
"""


def shape(pg, database: str) -> dict:
    return json.loads(pg.psql(SHAPE_SQL, database=database))


def checksums(pg, database: str) -> list[dict]:
    """Every table's rows and checksum, every sequence's position: what the drill compares."""
    result = subprocess.run(["psql", "-X", "-At", "-q", "-v", "ON_ERROR_STOP=1", "-d", database, "-f", str(CHECKSUMS)],
                            env=pg.env(), capture_output=True, text=True, check=True)
    return [json.loads(line) for line in result.stdout.splitlines()]


def databases_like(pg, prefix: str) -> list[str]:
    return pg.psql(f"SELECT string_agg(datname, ' ' ORDER BY datname) FROM pg_database WHERE datname LIKE '{prefix}%'").split()


def drop(pg, *names: str) -> None:
    for name in names:
        pg.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Drill:
    """One drill-like database, owned by its stage's role, and one backup of it in a bucket of its own."""

    def __init__(self, s3, pg, work: Path):
        suffix = uuid.uuid4().hex[:8]
        self.pg, self.stage_role, self.dba = pg, f"st_{suffix}", f"dba_{suffix}"
        self.database = self.stage_role
        self.password = f"pw-{secrets.token_urlsafe(12)}"
        pg.psql(f"CREATE ROLE {self.stage_role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE")
        subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1"], env=pg.env(KATFORGE_PASSWORD=self.password),
                       check=True, text=True, capture_output=True,
                       input=f"\\getenv password KATFORGE_PASSWORD\nALTER ROLE {self.stage_role} PASSWORD :'password';\n")
        pg.psql(f"CREATE ROLE {self.dba} NOLOGIN")
        pg.psql(f"CREATE DATABASE {self.database} OWNER {self.stage_role}")
        pg.psql(database_properties_sql(self.database, self.stage_role, self.dba))
        pg.psql(DRILL_SEED.format(stage=self.stage_role, dba=self.dba), database=self.database)
        self.backups = Backups(s3, pg, work)
        result = self.backups.backup(f"{STAGE}:{self.database}")
        assert result.returncode == 0, result.stderr
        [self.key] = self.backups.dumps(self.database)
        self.at = timestamp_of(self.key)
        self.shape, self.checksums = shape(pg, self.database), checksums(pg, self.database)

    def restore(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return self.backups.restore("--stage", STAGE, "--database", self.database, *args, **env)

    def remove(self) -> None:
        drop(self.pg, *databases_like(self.pg, self.database))
        self.pg.psql(f"DROP ROLE IF EXISTS {self.stage_role}; DROP ROLE IF EXISTS {self.dba}")


@pytest.fixture(scope="module")
def drill(s3, pg, tmp_path_factory) -> Drill:
    made = Drill(s3, pg, tmp_path_factory.mktemp("drill"))
    yield made
    made.remove()


@pytest.fixture
def targets(pg):
    """Names for restore targets; every database named after them is dropped after the test."""
    made: list[str] = []

    def name() -> str:
        made.append(f"rt_{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield name
    for target in made:
        drop(pg, *databases_like(pg, target))


def assert_restored(drill: Drill, database: str) -> None:
    """The copy is the dumped database: every object, owner and privilege, its own properties, every row."""
    restored = shape(drill.pg, database)
    assert restored["database"]["comment"] == "the stage's data"  # the properties came along, not by luck
    assert restored == drill.shape
    assert checksums(drill.pg, database) == drill.checksums


# --- finding 1: the documented restore works on realistic ownership ------------------------------

def test_a_rebuild_into_a_missing_database_brings_back_everything(drill, targets):
    """Finding 1 (a rebuild into an empty database: `permission denied to create extension`) and finding 6
    (owner, ACL and ALTER DATABASE ... SET were lost). Before: the stage's role could not create the
    extension; a superuser's restore lost the database's own properties."""
    target = targets()
    result = drill.restore("--at", "latest", "--target", target)
    assert result.returncode == 0, result.stderr
    assert_restored(drill, target)
    assert f"verified s3://{drill.backups.bucket}/{drill.key}" in result.stderr
    assert databases_like(drill.pg, target) == [target]  # no scratch database left behind


def test_a_restore_over_the_stages_own_database_replaces_it_whole(drill, targets, pg):
    """Finding 1 (`must be owner of extension vector`, `must be owner of index`): the runbook's restore
    over the stage's database, whose objects have several owners. The database it replaces is kept."""
    target = targets()
    assert drill.restore("--at", drill.at, "--target", target).returncode == 0
    pg.psql("UPDATE game.players SET name = 'changed'; DELETE FROM game.scores; DROP INDEX game.reports_body;"
            "CREATE TABLE game.added_since (id int)", database=target)
    result = drill.restore("--at", drill.at, "--target", target, "--force")
    assert result.returncode == 0, result.stderr
    assert_restored(drill, target)
    [kept] = [d for d in databases_like(pg, target) if d != target]
    assert kept.startswith(f"{target}__before_") and f"kept as {kept}" in result.stderr
    assert pg.psql("SELECT count(*) FROM game.added_since", database=kept) == "0"
    # The printed drop is the README's shell command, and it works (here without sudo: pg's superuser).
    [command] = re.findall(r"\(sudo -u postgres (dropdb -- \S+)\)$", result.stderr, re.M)
    subprocess.run(command.split(), env=pg.env(), check=True)
    assert databases_like(pg, target) == [target]


def test_the_stage_role_is_refused_at_once_with_the_command_that_works(drill, pg):
    """Before: the stage's role restored halfway and failed on the first object it did not own."""
    tcp = {"PGHOST": "127.0.0.1", "PGPORT": str(pg.port), "PGUSER": drill.stage_role, "PGPASSWORD": drill.password,
           "RESTORE_RUN_AS": ""}
    before = checksums(pg, drill.database)
    result = drill.restore("--at", drill.at, "--target", drill.database, "--force", **tcp)
    assert result.returncode == 2
    assert "REFUSED: a restore needs a superuser" in result.stderr
    assert "sudo katforge-restore" in result.stderr
    assert checksums(pg, drill.database) == before


# --- finding 2: a killed restore changes nothing --------------------------------------------------

@pytest.fixture(scope="module")
def slow(s3, pg, tmp_path_factory):
    """A database whose restore takes seconds: each row of one table is checked by a function that
    sleeps 20 ms (only outside the source database, so the seeding is quick)."""
    name = f"slow_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE DATABASE {name}")
    pg.psql(f"""CREATE FUNCTION slow_ok(int) RETURNS boolean LANGUAGE sql AS
                $$ SELECT pg_sleep(CASE current_database() WHEN '{name}' THEN 0 ELSE 0.02 END) IS NOT NULL $$;
                CREATE TABLE slow (id int CHECK (slow_ok(id)));
                INSERT INTO slow SELECT generate_series(1, 150);""", database=name)
    backups = Backups(s3, pg, tmp_path_factory.mktemp("slow"))
    assert backups.backup(f"{STAGE}:{name}").returncode == 0
    yield backups, name
    drop(pg, *databases_like(pg, name))


def wait_for(condition, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_killed_restore_leaves_the_target_as_it_was(slow, targets, pg):
    """Finding 2: `kill -TERM` ended the script but not pg_restore, which committed over the target
    seconds later. Now the signal stops pg_restore, and the target was never written to."""
    backups, source = slow
    target = targets()
    pg.psql(f"CREATE DATABASE {target}")
    pg.psql("CREATE TABLE slow (id int); INSERT INTO slow VALUES (42)", database=target)
    restore = subprocess.Popen(["bash", str(HOST / "restore-database.sh"), "--stage", STAGE, "--database", source,
                                "--at", "latest", "--target", target, "--force"],
                               env=backups.env(backups.operator, RESTORE_RUN_AS=RUN_AS), stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY public.slow%' "
                                 f"AND datname LIKE '{target}%'") == "1", "pg_restore to copy the slow table")
        restore.send_signal(15)
        _, errors = restore.communicate(timeout=20)
    finally:
        restore.kill()
    time.sleep(0.5)
    assert pg.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg_restore'") == "0", \
        "pg_restore goes on after the script was killed"
    assert pg.psql("SELECT json_agg(slow) FROM slow", database=target) == '[{"id":42}]'
    assert databases_like(pg, target) == [target]
    assert restore.returncode == 143, errors
    assert f"dropped {target}__restore; database {target} is as it was" in errors


# --- finding 3: a rebuild after the apps migrated ------------------------------------------------

def test_a_rebuild_after_the_redeployed_apps_migrated_replaces_their_tables(drill, targets, pg):
    """Finding 3: the apps' migrations ran first and added a table whose foreign key points at a table
    of the dump; `--clean` could not drop that table. The restore now replaces the database whole."""
    target = targets()
    pg.psql(f"CREATE DATABASE {target} OWNER {drill.stage_role}")
    pg.psql(f"SET ROLE {drill.stage_role}; CREATE SCHEMA game;"
            "CREATE TABLE game.players (id bigserial PRIMARY KEY, name text);"
            "CREATE TABLE game.sessions (id serial PRIMARY KEY, player_id bigint REFERENCES game.players)",
            database=target)
    result = drill.restore("--at", "latest", "--target", target, "--force")
    assert result.returncode == 0, result.stderr
    assert_restored(drill, target)


# --- finding 4: sessions on the target, and stopping the apps ------------------------------------

def session(pg, database: str, *statements: str, **env: str) -> subprocess.Popen:
    """A psql session that runs the statements and then stays connected (in its transaction) until it ends."""
    process = subprocess.Popen(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", database], env=pg.env(**env),
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    process.stdin.write("".join(f"{s};\n" for s in statements) + "SELECT 1;\n")
    process.stdin.flush()
    return process


def sessions_on(pg, database: str) -> int:
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{database}'"))


def test_a_session_idle_in_a_transaction_makes_the_restore_refuse_at_once(drill, targets, pg):
    """Finding 4: behind an idle-in-transaction session the restore waited forever while holding
    exclusive locks that locked the apps out. Now it names the session and refuses, having locked nothing."""
    target = targets()
    assert drill.restore("--at", drill.at, "--target", target).returncode == 0
    before = checksums(pg, target)
    idle = session(pg, target, "BEGIN", "SELECT count(*) FROM game.players", PGAPPNAME="api-worker")
    try:
        wait_for(lambda: sessions_on(pg, target) == 1, "the session")
        started = time.monotonic()
        result = drill.restore("--at", drill.at, "--target", target, "--force")
        assert time.monotonic() - started < 5
        # The apps were never locked out meanwhile.
        pg.psql("SET lock_timeout = '1s'; UPDATE shop.orders SET total = total WHERE id = 1000", database=target)
    finally:
        idle.communicate("ROLLBACK;\n", timeout=10)
    assert result.returncode == 1
    assert f"REFUSED: database {target} has other sessions" in result.stderr
    assert "application api-worker, idle in transaction" in result.stderr
    assert "--stop-apps" in result.stderr
    assert checksums(pg, target) == before
    assert databases_like(pg, target) == [target]


def test_a_lock_held_on_the_target_makes_the_switch_give_up_after_the_lock_timeout(drill, targets, pg):
    """The switch renames the target, which takes an exclusive lock on the database. A DBA's open
    transaction from another database that commented on the target holds a lock that conflicts
    with it: the rename gives up after RESTORE_LOCK_TIMEOUT (PGOPTIONS' lock_timeout) instead of waiting
    for that transaction (and locking out every new connection to the target meanwhile)."""
    target = targets()
    assert drill.restore("--at", drill.at, "--target", target).returncode == 0
    before = checksums(pg, target)
    dba = session(pg, "postgres", "BEGIN", f"COMMENT ON DATABASE {target} IS 'checked'",
                  PGAPPNAME="dba-psql")
    try:
        wait_for(lambda: pg.psql("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.objid "
                                 f"WHERE l.classid = 'pg_database'::regclass AND d.datname = '{target}' "
                                 "AND l.granted") == "1", "the DBA's lock")
        started = time.monotonic()
        result = drill.restore("--at", drill.at, "--target", target, "--force", RESTORE_LOCK_TIMEOUT="2s")
        elapsed = time.monotonic() - started
    finally:
        dba.communicate("ROLLBACK;\n", timeout=10)
    assert result.returncode != 0
    assert "canceling statement due to lock timeout" in result.stderr
    assert re.search(rf"could not rename database {target}; sessions holding a lock on it:\n"
                     r"  pid \d+, user \w+, database postgres, application dba-psql, idle in transaction .*: "
                     "ShareUpdateExclusiveLock", result.stderr)
    assert 2 <= elapsed < 30  # not the 60 s the harness waits for a restore stuck behind the lock
    assert f"dropped {target}__restore; database {target} is as it was" in result.stderr
    assert checksums(pg, target) == before
    assert databases_like(pg, target) == [target]


class Cluster:
    """tests/kube_api.py's server with the live estate's Deployments, over TLS and with the discovery
    documents kubectl reads first (a bearer token never goes to a plain-HTTP server). A Deployment
    scaled to 0 ends its pods: here, the database sessions registered as its pods."""

    def __init__(self, work: Path):
        self.api = serve(live_estate())
        ca = trustme.CA()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1").configure_cert(context)
        # The listening socket is wrapped in place: same descriptor, so the serving thread keeps it.
        self.api.server.socket = context.wrap_socket(self.api.server.socket, server_side=True)
        for pattern, reply in ((r"^/api$", lambda m: {"kind": "APIVersions", "versions": ["v1"]}),
                               (r"^/apis$", lambda m: {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                                   {"name": g.split("/")[0], "versions": [{"groupVersion": g, "version": g.split("/")[1]}],
                                    "preferredVersion": {"groupVersion": g, "version": g.split("/")[1]}}
                                   for g in sorted({k.api_version for k in KINDS if "/" in k.api_version})]}),
                               (r"^/(?:api/(?P<core>v1)|apis/(?P<gv>[^/]+/[^/]+))$", self._resources)):
            self.api.route("GET", re.compile(pattern))(lambda api, m, q, reply=reply: Reply(200, reply(m)))
        self.pods: dict[tuple[str, str], list[subprocess.Popen]] = {}
        self.api.listen(self._changed)
        self.kubeconfig = work / "katforge-config"
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "katforge",
            "clusters": [{"name": "katforge", "cluster": {
                "server": f"https://127.0.0.1:{self.api.server.server_address[1]}",
                "certificate-authority-data": base64.b64encode(ca.cert_pem.bytes()).decode()}}],
            "users": [{"name": "katforge", "user": {"token": self.api.token}}],
            "contexts": [{"name": "katforge", "context": {"cluster": "katforge", "user": "katforge"}}]}))

    @staticmethod
    def _resources(match: re.Match) -> dict:
        group_version = match["core"] or match["gv"]
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": [
            {"name": k.plural, "singularName": k.kind.lower(), "namespaced": k.namespaced, "kind": k.kind,
             "verbs": ["get", "list", "watch", "patch"]} for k in KINDS if k.api_version == group_version]}

    def _changed(self, event) -> None:
        if event.kind.kind == "Deployment" and event.object["spec"].get("replicas") == 0:
            for pod in self.pods.pop((event.namespace, event.object["metadata"]["name"]), []):
                pod.terminate()

    def replicas(self, namespace: str) -> dict[str, int]:
        return {name: obj["spec"]["replicas"] for (kind, ns, name), obj in self.api.objects.items()
                if kind.kind == "Deployment" and ns == namespace}

    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": str(self.kubeconfig), "STAGE_NAMESPACES": "prod:default qa:qa"}

    def stop(self) -> None:
        for pods in self.pods.values():
            for pod in pods:
                pod.kill()
        self.api.stop()


@pytest.fixture
def cluster(tmp_path):
    made = Cluster(tmp_path)
    yield made
    made.stop()


def test_stop_apps_scales_the_stages_deployments_to_0_for_the_switch_and_back(drill, targets, pg, cluster):
    """The rebuild runbook's "stop the apps" is done by the tool: with the apps' sessions open the restore
    scales their Deployments to 0, switches databases once the sessions are gone, and scales them back
    to the replicas they had (api had 2; a Deployment at 0 stays there)."""
    target = targets()
    assert drill.restore("--at", drill.at, "--target", target).returncode == 0
    pg.psql("DELETE FROM game.scores", database=target)
    for app, replicas in (("api", 2), ("lextris", 0)):
        deployment = copy.deepcopy(cluster.api.get("apps/v1", "Deployment", app, "default"))
        deployment["spec"]["replicas"] = replicas
        cluster.api.add(deployment)
    before = cluster.replicas("default")
    for app in ("api", "web"):
        cluster.pods[("default", app)] = [session(pg, target, "SELECT 1", PGAPPNAME=app)]
    wait_for(lambda: sessions_on(pg, target) == 2, "the apps' sessions")
    result = drill.restore("--at", drill.at, "--target", target, "--force", "--stop-apps", **cluster.env())
    assert result.returncode == 0, result.stderr
    assert_restored(drill, target)
    for app, replicas in before.items():
        if replicas:
            assert f"scaled deployment default/{app} from {replicas} to 0" in result.stderr
            assert f"scaled deployment default/{app} back to {replicas}" in result.stderr
    assert "lextris" not in result.stderr
    assert cluster.replicas("default") == before
    assert [r for r in cluster.api.requests if r.startswith("PATCH")] == [
        f"PATCH /apis/apps/v1/namespaces/default/deployments/{app}?fieldManager=kubectl-patch"
        for app in ("api", "stumper", "web", "api", "stumper", "web")]


def test_a_session_that_outlives_the_apps_is_named_and_the_apps_come_back(drill, targets, pg, cluster):
    target = targets()
    assert drill.restore("--at", drill.at, "--target", target).returncode == 0
    before_rows = checksums(pg, target)
    idle = session(pg, target, "BEGIN", "SELECT 1", PGAPPNAME="someones-psql")
    try:
        wait_for(lambda: sessions_on(pg, target) == 1, "the session")
        result = drill.restore("--at", drill.at, "--target", target, "--force", "--stop-apps",
                               RESTORE_SESSION_WAIT="1", **cluster.env())
    finally:
        idle.communicate("ROLLBACK;\n", timeout=10)
    assert result.returncode == 1
    assert f"REFUSED: database {target} still has other sessions" in result.stderr
    assert "application someones-psql" in result.stderr
    assert set(cluster.replicas("default").values()) == {1}  # scaled back
    assert checksums(pg, target) == before_rows
    assert databases_like(pg, target) == [target]


# --- finding 5: every dump is verified before anything is touched --------------------------------

@pytest.fixture
def damaged(s3, pg, tmp_path):
    """A bucket holding the drill database's dump and copies of it, damaged in the given ways."""
    def make(drill: Drill, **damage: str) -> Backups:
        backups = Backups(s3, pg, tmp_path)
        body = drill.backups.get(drill.key)
        for at, how in damage.items():
            manifest = drill.backups.manifest(drill.key)
            damaged = bytearray(body)
            if how == "truncated":
                damaged = damaged[: len(damaged) * 2 // 3]
            elif how == "bit-flipped":
                damaged[len(damaged) * 2 // 3] ^= 0x10
            key = f"{STAGE}/{drill.database}/{at}.dump"
            if how == "truncated-and-vouched":
                damaged = damaged[: len(damaged) * 2 // 3]
                manifest = {**manifest, "bytes": len(damaged), "sha256": hashlib.sha256(damaged).hexdigest()}
            backups.put(key, bytes(damaged))
            if how != "without-manifest":
                backups.put(key.removesuffix(".dump") + ".manifest.json", json.dumps(manifest).encode())
        return backups
    return make


@pytest.mark.parametrize("how, reason", [
    ("truncated", "its manifest says"),
    ("bit-flipped", "its sha256 differs from the manifest's"),
    ("truncated-and-vouched", "pg_restore cannot read it whole"),
    ("without-manifest", "it has no manifest"),
])
def test_a_damaged_dump_is_refused_before_the_target_is_created(drill, damaged, targets, pg, how, reason):
    """Finding 5: the archive check read only the table of contents, so a truncated or bit-flipped dump
    passed it, and `createdb` had run before the restore failed, leaving an empty database. Now the size
    and sha256 are checked against the manifest, the whole archive is read (even one whose manifest
    vouches for it), and nothing is created before."""
    backups = damaged(drill, **{"20250101T000000Z": how})
    target = targets()
    result = backups.restore("--stage", STAGE, "--database", drill.database, "--at", "20250101T000000Z",
                             "--target", target)
    assert result.returncode == 1
    assert f"REFUSED: s3://{backups.bucket}/{STAGE}/{drill.database}/20250101T000000Z.dump: " in result.stderr
    assert reason in result.stderr and "nothing changed" in result.stderr
    assert databases_like(pg, target) == []


def test_latest_is_the_newest_dump_that_passes_and_each_one_passed_over_is_named(drill, damaged, targets):
    backups = damaged(drill, **{"20250101T000000Z": "good", "20250102T000000Z": "bit-flipped",
                                "20250103T000000Z": "without-manifest"})
    target = targets()
    result = backups.restore("--stage", STAGE, "--at", "latest", "--target", target)
    assert result.returncode == 0, result.stderr
    prefix = f"s3://{backups.bucket}/{STAGE}/{drill.database}"
    passed_over = re.findall(r"passing over (\S+): ", result.stderr)
    assert passed_over == [f"{prefix}/2025010{day}T000000Z.dump" for day in (3, 2)]
    assert f"restored {prefix}/20250101T000000Z.dump into database {target}" in result.stderr
    assert_restored(drill, target)


def test_latest_with_no_dump_that_passes_changes_nothing(drill, damaged, targets, pg):
    backups = damaged(drill, **{"20250102T000000Z": "bit-flipped"})
    target = targets()
    result = backups.restore("--stage", STAGE, "--at", "latest", "--target", target)
    assert result.returncode == 1
    assert f"passing over s3://{backups.bucket}/{STAGE}/{drill.database}/20250102T000000Z.dump" in result.stderr
    assert "no dump under" in result.stderr and "passes its checks; nothing changed" in result.stderr
    assert databases_like(pg, target) == []


def test_a_non_empty_target_is_refused_without_force(drill, targets, pg):
    target = targets()
    pg.psql(f"CREATE DATABASE {target}")
    pg.psql("CREATE TABLE players (id int, note text); INSERT INTO players VALUES (1, 'precious')", database=target)
    result = drill.restore("--at", drill.at, "--target", target)
    assert result.returncode == 1
    assert "REFUSED" in result.stderr and "pass --force" in result.stderr
    assert pg.psql("SELECT json_agg(p) FROM players p", database=target) == '[{"id":1,"note":"precious"}]'

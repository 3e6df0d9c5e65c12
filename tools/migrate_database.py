"""`make migrate-database STAGE=...`: move a stage's database from the k3s host's PostgreSQL to RDS and
switch its apps there, with the apps stopped only for the switch of the data, and that time measured.

Run on an operator's machine, it reads the stage's facts (infra/settings.py) and its stack file, which
must say `katforge:database: migrating` (Pulumi has then made the RDS instance and the stage's role and
empty database on it, and written /etc/katforge/rds.env and the master user's pgpass on the host), and
runs itself on the k3s host over SSH (`--here`): RDS admits the nodes only, and the host holds the data,
the backup tooling and k3s's kubeconfig. On the host, as root, it needs nothing but Python's standard
library and the host's own programs. In this order:

1. Checks, changing nothing: RDS answers as its master user, the stage's role exists there and the
   master user may act as it, the stage's database on RDS is empty, every role the host's database
   names besides the stage's exists on RDS, the Secret `database` holds the apps' DATABASE_URL.
2. Stops the apps: the stage's Deployments scaled to 0 (their replicas noted), and waits for their
   sessions on the host's database to end. From here on the apps are down.
3. A verified dump, by the backup tooling itself (katforge-backup STAGE:DATABASE, infra/host/
   backup-databases.sh): the dump and its manifest (sha256, size, each table's row count and checksum
   and each sequence, read in the dump's own snapshot) land in the backup bucket.
4. Downloads both, checks the dump's size and sha256 against the manifest, and restores it into a new
   database <database>__migrate on RDS: extensions as the master user (RDS's rds_superuser), everything
   else as the stage's role (`pg_restore --no-owner --role`), so the role owns every object, as on the host.
5. Compares every table's row count and checksum and every sequence with the manifest
   (infra/host/table-checksums.sql, the drill's own check): a sequence may be ahead, never behind.
6. Switches: the verified copy takes the stage database's name on RDS (the empty one made by Pulumi goes),
   and the Secret's DATABASE_URL points at RDS (same role, password and database, `?sslmode=require`:
   what the program writes once the stage's config says `rds`).
7. Scales the apps back to their replicas and reports the time they were stopped.

Anything failing before the switch drops the copy on RDS and brings the apps back on the host's
database, untouched; the host's database is never written to. Afterwards: `pulumi config set
katforge:database rds --stack <stage>`, commit, `pulumi up` (the printed lines say so).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import quote, unquote, urlsplit

SUFFIX = "__migrate"
SESSIONS_SQL = """
SELECT format('pid %s, user %s, application %s, %s', pid, usename, coalesce(nullif(application_name, ''), '-'), state)
  FROM pg_stat_activity
 WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend' ORDER BY pid;
"""
# Roles the host's database names (owners, grantees) other than superusers: each must exist on RDS.
ROLES_SQL = """
SELECT DISTINCT r.rolname FROM pg_shdepend d JOIN pg_roles r ON r.oid = d.refobjid
 WHERE d.refclassid = 'pg_authid'::regclass AND NOT r.rolsuper
   AND d.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
 UNION SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()
 ORDER BY 1;
"""
EMPTY_SQL = """
SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%';
"""


class MigrationError(Exception):
    """A step that failed or refused; the message says what and how to go on."""


@dataclass(frozen=True)
class StageFacts:
    stage: str
    namespace: str
    database: str
    role: str


@dataclass
class Host:
    """The programs and files of the k3s host (each overridable, for the tests)."""
    env: dict = field(default_factory=lambda: dict(os.environ))

    def get(self, name: str, default: str) -> str:
        return self.env.get(name) or default

    def file_settings(self, path: str) -> dict[str, str]:
        """KEY=VALUE lines of an environment file as systemd and the host scripts read them."""
        out = {}
        for line in Path(path).read_text().splitlines():
            key, equals, value = line.partition("=")
            if equals and not key.startswith("#"):
                out[key.strip()] = value.strip().strip('"')
        return out

    def run(self, args: list[str], *, env: Optional[dict] = None, stdin: Optional[str] = None,
            what: str = "") -> str:
        done = subprocess.run(args, input=stdin, env=env or self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise MigrationError(f"{what or args[0]} failed: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    # --- the host's PostgreSQL: as its OS user over the socket, as the backups do ---
    def host_psql(self, database: str, sql: str) -> str:
        run_as = self.env.get("MIGRATE_RUN_AS", "postgres")
        prefix = ["runuser", "-u", run_as, "--"] if run_as else []
        return self.run([*prefix, "psql", "-X", "-At", "-q", "-v", "ON_ERROR_STOP=1", "-d", database],
                        stdin=sql, what="psql on the host's PostgreSQL")

    # --- RDS: as its master user, with the settings Pulumi wrote ---
    def rds_env(self) -> dict:
        settings = self.file_settings(self.get("RDS_ENV_FILE", "/etc/katforge/rds.env"))
        return {**self.env, **{k: v for k, v in settings.items() if k.startswith("PG")}}

    def rds_psql(self, database: str, sql: str, *variables: str) -> str:
        sets = [arg for name_value in variables for arg in ("-v", name_value)]
        return self.run(["psql", "-X", "-At", "-q", "-v", "ON_ERROR_STOP=1", *sets, "-d", database],
                        env=self.rds_env(), stdin=sql, what="psql on RDS")

    def kubectl(self, *args: str, stdin: Optional[str] = None) -> str:
        env = {"KUBECONFIG": "/etc/rancher/k3s/k3s.yaml", **self.env}
        return self.run([*shlex.split(self.get("KUBECTL", "kubectl")), *args], env=env, stdin=stdin, what="kubectl")


def log(message: str) -> None:
    print(f"migrate-database: {message}", file=sys.stderr, flush=True)


def rds_database_url(current: str, address: str, port: int) -> str:
    """The apps' DATABASE_URL with RDS for the host (the program's form: infra/apps.py database_url)."""
    url = urlsplit(current)
    if url.scheme not in ("postgres", "postgresql") or not url.username or url.password is None:
        raise MigrationError("the Secret's DATABASE_URL is not postgres://<role>:<password>@<host>:<port>/<database>")
    user, password = quote(unquote(url.username), safe=""), quote(unquote(url.password), safe="")
    return f"postgres://{user}:{password}@{address}:{port}{url.path}?sslmode=require"


def compare(manifest: dict, restored: list[dict]) -> list[str]:
    """Where the restored copy differs from the manifest: each table's rows and checksum; each sequence,
    which may only be ahead (sequences are outside the dump's snapshot)."""
    found = {(("table", r["table"]) if "table" in r else ("sequence", r["sequence"])): r for r in restored}
    problems = []
    for want in manifest["relations"]:
        key = ("table", want["table"]) if "table" in want else ("sequence", want["sequence"])
        got = found.pop(key, None)
        if got is None:
            problems.append(f"{key[0]} {key[1]} is missing on RDS")
        elif key[0] == "table" and (got["rows"], got["checksum"]) != (want["rows"], want["checksum"]):
            problems.append(f"table {key[1]}: {got['rows']} rows, checksum {got['checksum']} on RDS; "
                            f"{want['rows']} rows, checksum {want['checksum']} in the dump")
        elif key[0] == "sequence" and (got["value"] or 0) < (want["value"] or 0):
            problems.append(f"sequence {key[1]} is at {got['value']} on RDS, behind the dump's {want['value']}")
    problems += [f"{kind} {name} is on RDS but not in the dump" for kind, name in found]
    return problems


class Migration:
    def __init__(self, facts: StageFacts, host: Host):
        self.facts, self.host = facts, host
        self.scratch = facts.database + SUFFIX
        self.scaled: list[tuple[str, int]] = []
        self.timings: dict[str, float] = {}
        self.work = Path(tempfile.mkdtemp(prefix="katforge-migrate-"))

    # --- 1 ---------------------------------------------------------------------------------------
    def check(self) -> dict:
        facts, host = self.facts, self.host
        rds = host.rds_env()
        log(f"RDS is {rds.get('PGHOST')}:{rds.get('PGPORT', 5432)}, as {rds.get('PGUSER')}")
        state = host.rds_psql("postgres", """
            SELECT json_build_object(
              'role', EXISTS (SELECT FROM pg_roles WHERE rolname = :'role'),
              'member', CASE WHEN EXISTS (SELECT FROM pg_roles WHERE rolname = :'role')
                             THEN pg_has_role(current_user, :'role', 'SET') ELSE false END,
              'database', EXISTS (SELECT FROM pg_database WHERE datname = :'database'),
              'scratch', EXISTS (SELECT FROM pg_database WHERE datname = :'scratch'),
              'roles', (SELECT coalesce(json_agg(rolname), '[]') FROM pg_roles));
            """, f"role={facts.role}", f"database={facts.database}", f"scratch={self.scratch}")
        state = json.loads(state)
        if not (state["role"] and state["member"] and state["database"]):
            raise MigrationError(f"RDS has no role {facts.role} the master user may act as, or no database "
                                 f"{facts.database}: set katforge:database migrating for {facts.stage} and pulumi up")
        if int(host.rds_psql(facts.database, EMPTY_SQL).strip()) != 0:
            raise MigrationError(f"database {facts.database} on RDS holds objects already: it is migrated, or "
                                 "in use; nothing was changed")
        if state["scratch"]:
            log(f"dropping {self.scratch} on RDS, left by an interrupted migration")
            host.rds_psql("postgres", 'DROP DATABASE :"scratch" WITH (FORCE);', f"scratch={self.scratch}")
        named = set(host.host_psql(facts.database, ROLES_SQL).split()) - {facts.role}
        missing = sorted(named - set(state["roles"]))
        if missing:
            raise MigrationError(f"the host's database {facts.database} names roles RDS does not have: "
                                 f"{', '.join(missing)}. Create them on RDS first (as {rds.get('PGUSER')}); "
                                 "nothing was changed")
        current = self.database_url()
        log(f"the apps of {facts.stage} use {urlsplit(current).hostname}; the Secret database will point at RDS")
        return rds

    def database_url(self) -> str:
        data = self.host.kubectl("--namespace", self.facts.namespace, "get", "secret", "database",
                                 "--output=jsonpath={.data.DATABASE_URL}")
        if not data.strip():
            raise MigrationError(f"Secret {self.facts.namespace}/database has no DATABASE_URL")
        return base64.b64decode(data).decode()

    # --- 2 and 7 ---------------------------------------------------------------------------------
    def scale(self, deployment: str, replicas: int) -> None:
        self.host.kubectl("--namespace", self.facts.namespace, "patch", "deployment", deployment, "--type=merge",
                          f"--patch={json.dumps({'spec': {'replicas': replicas}})}")

    def stop_apps(self) -> None:
        listed = self.host.kubectl("--namespace", self.facts.namespace, "get", "deployments", "--output=jsonpath="
                                   "{range .items[?(@.spec.replicas>0)]}{.metadata.name} {.spec.replicas}{\"\\n\"}{end}")
        for line in listed.splitlines():
            name, replicas = line.split()
            self.scaled.append((name, int(replicas)))
            self.scale(name, 0)
            log(f"scaled deployment {self.facts.namespace}/{name} from {replicas} to 0")
        wait = float(self.host.get("MIGRATE_SESSION_WAIT", "60"))
        deadline = time.monotonic() + wait
        while (sessions := self.host.host_psql(self.facts.database, SESSIONS_SQL).strip()) and \
                time.monotonic() < deadline:
            time.sleep(0.5)
        if sessions:
            raise MigrationError(f"the host's database {self.facts.database} still has sessions {wait:.0f}s after the "
                                 f"apps stopped (end them, then run this again):\n  " + sessions.replace("\n", "\n  "))

    def start_apps(self) -> None:
        for name, replicas in self.scaled:
            try:
                self.scale(name, replicas)
                log(f"scaled deployment {self.facts.namespace}/{name} back to {replicas}")
            except MigrationError as error:
                log(f"could not scale {name} back ({error}): kubectl -n {self.facts.namespace} scale deployment "
                    f"{name} --replicas={replicas}")
        self.scaled = []

    # --- 3 and 4 ---------------------------------------------------------------------------------
    def dump(self) -> tuple[Path, dict]:
        facts, host = self.facts, self.host
        env = {**host.file_settings(host.get("KATFORGE_ENV_FILE", "/etc/katforge/backup.env")), **host.env}
        command = [*shlex.split(host.get("BACKUP_COMMAND", "katforge-backup")), f"{facts.stage}:{facts.database}"]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        sys.stderr.write(done.stderr)
        # backup-databases.sh says "ok <key>.dump (<bytes> bytes, sha256 <hex>)" once dump and manifest landed.
        found = re.search(rf"^katforge-backup: ok ({re.escape(facts.stage)}/{re.escape(facts.database)}/\S+)\.dump ",
                          done.stderr, flags=re.M)
        if done.returncode != 0 or not found:
            raise MigrationError(f"the backup of {facts.stage}:{facts.database} failed (see above); nothing was changed")
        key = found.group(1)
        bucket, folder, name = env.get("BACKUP_BUCKET", ""), *key.rsplit("/", 1)
        # Both in one run of the CLI (each start costs half a second of the apps' downtime).
        self.host.run(["aws", "s3", "cp", "--only-show-errors", "--recursive", f"s3://{bucket}/{folder}/",
                       str(self.work), "--exclude", "*", "--include", f"{name}.dump", "--include",
                       f"{name}.manifest.json"], env=env, what="aws s3 cp")
        dump, manifest = self.work / f"{name}.dump", json.loads((self.work / f"{name}.manifest.json").read_text())
        digest = hashlib.sha256(dump.read_bytes()).hexdigest()
        if dump.stat().st_size != manifest["bytes"] or digest != manifest["sha256"]:
            raise MigrationError(f"s3://{bucket}/{key}.dump is not what its manifest says (size or sha256)")
        log(f"verified s3://{bucket}/{key}.dump ({manifest['bytes']} bytes, sha256 {digest})")
        settings = manifest["database"].get("settings") or []
        if settings:
            log("not carried, set on RDS by hand if the apps need them (ALTER DATABASE ... SET): "
                + ", ".join(f"{s['setting']}" + (f" for {s['role']}" if s["role"] else "") for s in settings))
        return dump, manifest

    def restore(self, dump: Path) -> None:
        facts, host = self.facts, self.host
        host.rds_psql("postgres", 'CREATE DATABASE :"scratch" OWNER :"role";', f"scratch={self.scratch}",
                      f"role={facts.role}")
        # Extensions (and their comments) as the master user: only rds_superuser creates an untrusted one,
        # and only the owner comments on it. Everything else as the stage's role, which then owns it.
        listing = host.run(["pg_restore", "--list", str(dump)], what="pg_restore --list").splitlines(keepends=True)
        extensions = [line for line in listing if re.search(r"^\d+; \d+ \d+ (EXTENSION|COMMENT - EXTENSION) ", line)]
        (self.work / "extensions.list").write_text("".join(extensions))
        (self.work / "objects.list").write_text("".join(line for line in listing if line not in extensions))
        rds = host.rds_env()
        jobs = host.get("MIGRATE_JOBS", "2")
        if extensions:
            host.run(["pg_restore", "--exit-on-error", f"--use-list={self.work / 'extensions.list'}",
                      f"--dbname={self.scratch}", str(dump)], env=rds, what="pg_restore of the extensions")
        host.run(["pg_restore", "--exit-on-error", f"--jobs={jobs}", "--no-owner", f"--role={facts.role}",
                  f"--use-list={self.work / 'objects.list'}", f"--dbname={self.scratch}", str(dump)],
                 env=rds, what="pg_restore")

    # --- 5 ---------------------------------------------------------------------------------------
    def verify(self, manifest: dict) -> int:
        checksums = Path(self.host.get("KATFORGE_LIB_DIR", "/usr/local/lib/katforge")) / "table-checksums.sql"
        lines = self.host.rds_psql(self.scratch, checksums.read_text()).splitlines()
        problems = compare(manifest, [json.loads(line) for line in lines if line.startswith("{")])
        if problems:
            raise MigrationError("the copy on RDS differs from the dump; the apps stay on the host:\n  "
                                 + "\n  ".join(problems))
        return len(manifest["relations"])

    # --- 6 ---------------------------------------------------------------------------------------
    def switch(self, rds: dict) -> None:
        facts = self.facts
        self.host.rds_psql("postgres", """
            DROP DATABASE :"database";
            ALTER DATABASE :"scratch" RENAME TO :"database";
            REVOKE CONNECT ON DATABASE :"database" FROM PUBLIC;
            GRANT CONNECT ON DATABASE :"database" TO :"role";
            """, f"database={facts.database}", f"scratch={self.scratch}", f"role={facts.role}")
        url = rds_database_url(self.database_url(), rds["PGHOST"], int(rds.get("PGPORT", "5432")))
        patch = json.dumps({"data": {"DATABASE_URL": base64.b64encode(url.encode()).decode()}})
        self.host.kubectl("--namespace", facts.namespace, "patch", "secret", "database", "--type=merge",
                          "--patch-file=/dev/stdin", stdin=patch)
        log(f"Secret {facts.namespace}/database: DATABASE_URL points at {rds['PGHOST']}")

    def run(self) -> dict:
        """The migration, then its work directory goes: it holds a whole copy of the stage's data (the dump
        is in the bucket already)."""
        try:
            return self._run()
        finally:
            shutil.rmtree(self.work, ignore_errors=True)

    def _run(self) -> dict:
        facts = self.facts
        rds = self.check()
        started = time.monotonic()
        switched = False
        try:
            self.stop_apps()
            stopped = time.monotonic()
            dump, manifest = self.dump()
            dumped = time.monotonic()
            self.restore(dump)
            restored = time.monotonic()
            relations = self.verify(manifest)
            verified = time.monotonic()
            self.switch(rds)
            switched = True
        except BaseException:
            if not switched:
                try:
                    self.host.rds_psql("postgres", 'DROP DATABASE IF EXISTS :"scratch" WITH (FORCE);',
                                       f"scratch={self.scratch}")
                except MigrationError as error:
                    log(f"could not drop {self.scratch} on RDS ({error}): drop it by hand")
            raise
        finally:
            self.start_apps()
            back = time.monotonic()
        report = {"stage": facts.stage, "database": facts.database, "rds": rds["PGHOST"], "bytes": manifest["bytes"],
                  "relations": relations, "seconds": {
                      "stop_apps": round(stopped - started, 3), "dump": round(dumped - stopped, 3),
                      "restore": round(restored - dumped, 3), "verify": round(verified - restored, 3),
                      "switch": round(back - verified, 3), "downtime": round(back - started, 3)}}
        log(f"moved {facts.stage}:{facts.database} ({manifest['bytes']} bytes dumped) to RDS; {relations} tables and "
            f"sequences match the dump; the apps were stopped for {report['seconds']['downtime']:.1f} s "
            f"(dump {report['seconds']['dump']:.1f} s, restore {report['seconds']['restore']:.1f} s, "
            f"checks {report['seconds']['verify']:.1f} s)")
        log(f"now: pulumi config set katforge:database rds --stack {facts.stage}, commit Pulumi.{facts.stage}.yaml, "
            "pulumi up (it rolls the apps once more; their DATABASE_URL stays as it is now)")
        return report


def on_host(args: argparse.Namespace) -> int:
    facts = StageFacts(args.stage, args.namespace, args.database, args.role)
    try:
        report = Migration(facts, Host()).run()
    except MigrationError as error:
        log(f"FAILED: {error}")
        return 1
    if args.report:
        Path(args.report).write_text(json.dumps(report) + "\n")
    print(json.dumps(report))
    return 0


def from_operator(args: argparse.Namespace) -> int:
    """The stage's facts from the program, its stack file's say, then this file run on the host."""
    from infra.settings import STAGES
    from tools.offline import stack_config

    if args.stage not in STAGES:
        log(f"no stage {args.stage}: {', '.join(STAGES)}")
        return 2
    stage = STAGES[args.stage]
    place = stack_config(args.stage).get("katforge:database", "host")
    if place != "migrating":
        log(f"Pulumi.{args.stage}.yaml says katforge:database {place}: set it to migrating, pulumi up (RDS, and the "
            f"stage's role and empty database on it), then run this again")
        return 2
    remote = ["sudo", "python3", "-", "--here", "--stage", stage.name, "--namespace", stage.namespace,
              "--database", stage.database, "--role", stage.db_role]
    with open(__file__) as source:  # python3 reads the program from stdin, so nothing needs installing
        return subprocess.run(["ssh", args.ssh, shlex.join(remote)], stdin=source).returncode


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make migrate-database", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", required=True,
                        help="the stage whose database moves (prod or qa; move qa first, it rehearses prod's move); "
                             "its stack file must say katforge:database migrating")
    parser.add_argument("--ssh", default="ubuntu@k3s.katforge.com",
                        help="the k3s host as user@host, where the tool runs itself over SSH: RDS admits the nodes "
                             "only (default: %(default)s)")
    parser.add_argument("--here", action="store_true",
                        help="run on this machine, the k3s host, as root (the operator's run passes it, with "
                             "--namespace, --database and --role, over SSH)")
    parser.add_argument("--namespace", help="with --here: the stage's namespace, whose Deployments are stopped and "
                                            "whose Secret `database` gets the RDS DATABASE_URL")
    parser.add_argument("--database", help="with --here: the stage's database, dumped on the host and restored "
                                           "under the same name on RDS")
    parser.add_argument("--role", help="with --here: the stage's role, which owns every restored object on RDS "
                                       "(the extensions are the master user's)")
    parser.add_argument("--report", help="with --here: also write the report it prints (JSON: bytes dumped, relations "
                                        "compared, seconds stopped) to this file")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = arguments()
    args = parser.parse_args(argv)
    if args.here:
        if not (args.namespace and args.database and args.role):
            parser.error("--here needs --namespace, --database and --role")
        return on_host(args)
    return from_operator(args)


if __name__ == "__main__":
    sys.exit(main())

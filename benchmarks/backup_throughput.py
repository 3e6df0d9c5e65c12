"""Backup and restore throughput of the host scripts on a realistic database: the figures behind the
README's RPO and RTO.

Generates a database of at least --size-mb MiB (default 600) on a throwaway PostgreSQL 16 (pgserver)
configured as the k3s host is (infra/host/postgresql-katforge.conf): an events table with jsonb
payloads under a GIN index and btree indexes, and player profiles whose long text is TOASTed (random,
so it neither compresses in TOAST nor much in the dump), sequences, a view. Then, against moto's S3 on
127.0.0.1 with the host's writer policy and the operators' read policy:

- backup: infra/host/backup-databases.sh (pg_dump streamed to S3, the manifest read in its snapshot);
- restore: infra/host/restore-database.sh into a new database (download, sha256, every block read,
  pg_restore --jobs 2, the database's properties, the rename), with its report's breakdown;
- the restored copy's row counts and checksums compared with the manifest, as the drill does.

Prints the figures; it is no test (a timed test fails on a busy machine, not on slow code). Run it on an
otherwise quiet machine (`uptime`): the targets are a backup at 25 MiB/s and a restore at 20 MiB/s of
database size, on 2 cores.

    python -m benchmarks.backup_throughput [--size-mb 600]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from infra.bootstrap import HOST_FILES
from tests.pgcluster import PgCluster, find_bin_dir, free_port
from tests.s3_sandbox import STAGE, Backups, S3Sandbox

MIB = 1024 * 1024
SCHEMA = """
CREATE TABLE events (id bigserial PRIMARY KEY, player int NOT NULL, kind text NOT NULL, payload jsonb NOT NULL,
                     created timestamptz NOT NULL);
CREATE INDEX events_player ON events (player, created);
CREATE INDEX events_payload ON events USING gin (payload jsonb_path_ops);
CREATE TABLE profiles (id bigserial PRIMARY KEY, name text NOT NULL, bio text, tags text[], settings jsonb);
CREATE INDEX profiles_name ON profiles (name);
CREATE INDEX profiles_tags ON profiles USING gin (tags);
CREATE VIEW active AS SELECT player, count(*) FROM events WHERE created > '2024-06-01' GROUP BY player;
"""
# One round (at the benchmark's counts, 150000 events and 4000 profiles): ~60 MiB of events with their
# indexes and ~15 MiB of profiles, 3 kB of random text each.
FILL = """
INSERT INTO events (player, kind, payload, created)
SELECT (random() * 50000)::int, (ARRAY['login', 'score', 'purchase', 'level'])[1 + (i % 4)],
       jsonb_build_object('session', md5(random()::text), 'score', (random() * 100000)::int,
                          'level', i % 60, 'items', jsonb_build_array(i % 13, i % 7, 'sku-' || i % 101)),
       timestamptz '2024-01-01' + i * interval '1 second'
FROM generate_series(1, {events}) AS i;
INSERT INTO profiles (name, bio, tags, settings)
SELECT 'player ' || i || ' ' || md5(random()::text),
       (SELECT string_agg(md5(random()::text || j), '') FROM generate_series(1, 96) j),
       ARRAY['t' || i % 17, 't' || i % 29, 'league-' || i % 5],
       jsonb_build_object('theme', i % 3, 'sound', i % 2 = 0)
FROM generate_series(1, {profiles}) AS i;
"""


def database_bytes(pg: PgCluster, name: str) -> int:
    return int(pg.psql(f"SELECT pg_database_size('{name}')"))


def checksums(pg: PgCluster, database: str) -> list[dict]:
    result = subprocess.run(["psql", "-X", "-At", "-q", "-v", "ON_ERROR_STOP=1", "-d", database,
                             "-f", str(HOST_FILES / "table-checksums.sql")],
                            env=pg.env(), capture_output=True, text=True, check=True)
    return [json.loads(line) for line in result.stdout.splitlines()]


def timed(action) -> float:
    start = time.monotonic()
    result = action()
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=600, help="the database's size in MiB, at least")
    args = parser.parse_args()
    load = os.getloadavg()

    # Separate directories: the cluster's own is handed to the server's OS user.
    pg_root, work = (Path(tempfile.mkdtemp(prefix=f"katforge-bench-{what}-")) for what in ("pg", "work"))
    pg = PgCluster(root=pg_root, bin_dir=find_bin_dir(), port=free_port())
    pg.start()
    (pg.conf_dir / "conf.d" / "katforge.conf").write_text((HOST_FILES / "postgresql-katforge.conf").read_text())
    pg.pg_ctl("restart", "-w", "-m", "fast", "-l", str(pg.root / "server.log"))
    s3 = S3Sandbox()
    try:
        backups = Backups(s3, pg, work)
        pg.psql("CREATE DATABASE bench")
        pg.psql(SCHEMA, database="bench")
        started = time.monotonic()
        while database_bytes(pg, "bench") < args.size_mb * MIB:
            pg.psql(FILL.format(events=150000, profiles=4000), database="bench")
        pg.psql("VACUUM ANALYZE", database="bench")
        generated = time.monotonic() - started
        size = database_bytes(pg, "bench")
        toast = int(pg.psql("SELECT pg_total_relation_size(reltoastrelid) FROM pg_class WHERE relname = 'profiles'",
                            database="bench"))
        indexes = int(pg.psql("SELECT sum(pg_relation_size(indexrelid)) FROM pg_index JOIN pg_class c ON c.oid = indrelid "
                              "WHERE c.relname IN ('events', 'profiles')", database="bench"))

        backup_s = timed(lambda: backups.backup(f"{STAGE}:bench"))
        [key] = backups.dumps("bench")
        dump = backups.admin.head_object(Bucket=backups.bucket, Key=key)["ContentLength"]
        report = work / "report.json"
        restore_s = timed(lambda: backups.restore("--stage", STAGE, "--database", "bench", "--at", "latest",
                                                  "--target", "bench_restored", "--report", str(report)))
        seconds = json.loads(report.read_text())["seconds"]
        manifest = backups.manifest(key)
        if checksums(pg, "bench_restored") != [r for r in manifest["relations"]]:
            raise SystemExit("the restored copy differs from the manifest")
    finally:
        s3.stop()
        pg.stop()
        for directory in (pg_root, work):
            shutil.rmtree(directory, ignore_errors=True)

    print(f"machine               {os.cpu_count()} cores; load average before the run: "
          f"{' '.join(f'{x:.2f}' for x in load)}; after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"database size         {size / MIB:8.1f} MiB (pg_database_size; {toast / MIB:.0f} MiB TOAST, "
          f"{indexes / MIB:.0f} MiB indexes incl. GIN), generated in {generated:.0f} s")
    print(f"dump size             {dump / MIB:8.1f} MiB (custom format, gzip)")
    print(f"backup  (dump+upload) {backup_s:8.1f} s  {size / MIB / backup_s:8.1f} MiB/s of database (target 25)")
    print(f"restore (all of it)   {restore_s:8.1f} s  {size / MIB / restore_s:8.1f} MiB/s of database (target 20)")
    print(f"  download and verify {seconds['download_and_verify']:8.1f} s  (sha256, every block read)")
    print(f"  pg_restore --jobs 2 {seconds['restore']:8.1f} s  {size / MIB / seconds['restore']:8.1f} MiB/s "
          f"(tables, indexes, properties)")
    tables = sum("table" in r for r in manifest["relations"])
    print(f"the copy matches the manifest: {tables} tables, {len(manifest['relations']) - tables} sequences")
    print(f"estimated restore of a 1 GiB database: {1024 / (size / MIB / restore_s) / 60:.1f} min")


if __name__ == "__main__":
    main()

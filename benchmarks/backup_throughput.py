"""Backup and restore throughput of infra/host/backup-databases.sh and restore-database.sh.

Generates a database of at least --size-mb MB (default 100) on a throwaway PostgreSQL 16 (pgserver),
backs it up to moto's S3 on 127.0.0.1 with the host's writer policy, restores it into a fresh database
with the operators' policy, checks the copy, and prints the figures. The same run times a restore of the
tests' small seeded database (the RTO floor: tool start-up and round trips, not data).

    python -m benchmarks.backup_throughput [--size-mb 100]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from tests.pgcluster import PgCluster, find_bin_dir, free_port
from tests.test_backup_scripts import SEED, STAGE, Backups, S3Sandbox

MB = 1024 * 1024
# ~190 bytes a row on disk, mixed text/JSON/time like the games' tables; compresses about as well.
FILL = """
INSERT INTO events (player, kind, payload, created)
SELECT (random() * 50000)::int, (ARRAY['login', 'score', 'purchase', 'level'])[1 + (i % 4)],
       jsonb_build_object('session', md5(i::text), 'score', (random() * 100000)::int, 'note', md5(random()::text)),
       timestamptz '2024-01-01' + i * interval '1 second'
FROM generate_series(1, 200000) AS i
"""


def timed(action) -> float:
    start = time.monotonic()
    result = action()
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    return elapsed


def database_bytes(pg: PgCluster, name: str) -> int:
    return int(pg.psql(f"SELECT pg_database_size('{name}')"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=100)
    args = parser.parse_args()

    # Separate directories: the cluster's own is handed to the server's OS user.
    pg_root, work = (Path(tempfile.mkdtemp(prefix=f"katforge-bench-{what}-")) for what in ("pg", "work"))
    pg = PgCluster(root=pg_root, bin_dir=find_bin_dir(), port=free_port())
    pg.start()
    s3 = S3Sandbox()
    try:
        backups = Backups(s3, pg, work)
        pg.psql("CREATE DATABASE bench")
        pg.psql("CREATE TABLE events (id bigserial PRIMARY KEY, player int, kind text, payload jsonb, "
                "created timestamptz)", database="bench")
        while database_bytes(pg, "bench") < args.size_mb * MB:
            pg.psql(FILL, database="bench")
        pg.psql("VACUUM ANALYZE events", database="bench")
        size = database_bytes(pg, "bench")

        backup_s = timed(lambda: backups.backup(f"{STAGE}:bench"))
        [key] = backups.keys(f"{STAGE}/bench/")
        dump = backups.admin.head_object(Bucket=backups.bucket, Key=key)["ContentLength"]
        at = key.rsplit("/", 1)[1].removesuffix(".dump")
        restore_s = timed(lambda: backups.restore("--stage", STAGE, "--database", "bench", "--at", at,
                                                  "--target", "bench_restored"))
        count = "SELECT count(*), sum(hashtext(e::text)::numeric) FROM events e"
        if pg.psql(count, database="bench_restored") != pg.psql(count, database="bench"):
            raise SystemExit("the restored copy differs from the source")

        pg.psql("CREATE DATABASE seeded")
        pg.psql(SEED, database="seeded")
        assert backups.backup(f"{STAGE}:seeded").returncode == 0
        [seeded_key] = backups.keys(f"{STAGE}/seeded/")
        seeded_at = seeded_key.rsplit("/", 1)[1].removesuffix(".dump")
        seeded_s = timed(lambda: backups.restore("--stage", STAGE, "--database", "seeded", "--at", seeded_at,
                                                 "--target", "seeded_restored"))
    finally:
        s3.stop()
        pg.stop()
        for directory in (pg_root, work):
            shutil.rmtree(directory, ignore_errors=True)

    print(f"database size         {size / MB:8.1f} MB (pg_database_size)")
    print(f"dump size             {dump / MB:8.1f} MB (custom format, compressed)")
    print(f"backup  (dump+upload) {backup_s:8.1f} s  {size / MB / backup_s:8.1f} MB/s of database")
    print(f"restore (fetch+load)  {restore_s:8.1f} s  {size / MB / restore_s:8.1f} MB/s of database")
    print(f"restore, seeded test database (500 rows): {seeded_s:.1f} s")
    print(f"estimated restore of a 1 GB database: {1024 / (size / MB / restore_s) / 60:.1f} min")


if __name__ == "__main__":
    main()

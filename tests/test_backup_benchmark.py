"""Finding 7: the README's restore speed came from a benchmark of one plain table. The benchmark's
database must stay like the drill's where speed is concerned: GIN and btree indexes, TOASTed text,
jsonb. Here its schema and a small fill (the benchmark itself is timed by hand, never in a test)."""
from __future__ import annotations

import uuid

from benchmarks.backup_throughput import FILL, SCHEMA


def test_the_benchmark_database_has_gin_and_btree_indexes_and_toasted_text(pg):
    name = f"bench_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE DATABASE {name}")
    try:
        pg.psql(SCHEMA, database=name)
        pg.psql(FILL.format(events=500, profiles=20), database=name)
        methods = pg.psql("SELECT string_agg(DISTINCT am.amname, ' ' ORDER BY am.amname) FROM pg_index i "
                          "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam", database=name)
        assert methods == "btree gin"
        # Out of line in the TOAST table, and not compressed there (random text): the dump has to carry it.
        toasted = pg.psql("SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE relname = 'profiles'", database=name)
        assert int(toasted) > 20 * 2500
        assert pg.psql("SELECT count(*) FROM profiles WHERE pg_column_compression(bio) IS NULL "
                       "AND octet_length(bio) > 2500", database=name) == "20"
        assert pg.psql("SELECT count(*) FROM events WHERE payload ? 'items'", database=name) == "500"
    finally:
        pg.psql(f"DROP DATABASE {name}")

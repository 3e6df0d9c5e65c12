-- Every table's row count and checksum and every sequence's position in the current database, one line
-- of JSON each, in name order: {"table": "schema.name", "rows": N, "checksum": "S"} and
-- {"sequence": "schema.name", "value": N}.
-- Fed to psql as text in places that must agree: katforge-backup, in the dump's own snapshot (the
-- manifest), katforge-drill on the restored copy, migrate-database on RDS's copy. Installed as
-- /usr/local/lib/katforge/; the scripts read it, psql never opens it (postgres may not reach the file).
--
-- A checksum is the sum of a 64-bit hash of each row's text, so it does not depend on row order; the
-- settings below fix how values print, so both sides print a row alike. Only what pg_dump copies
-- row by row is counted: ordinary tables (ONLY, without their inheritance children), not the
-- members of extensions, not materialized views (a restore refreshes them from the restored tables).
-- psql's \gexec runs the query built for each one.
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
SET extra_float_digits = 3;
SET bytea_output = 'hex';
SELECT CASE c.relkind
         WHEN 'r' THEN format('SELECT json_build_object(''table'', %L, ''rows'', count(*), ''checksum'', '
                              'coalesce(sum(hashtextextended(t::text, 0)::numeric), 0)::text) FROM ONLY %s AS t',
                              format('%I.%I', n.nspname, c.relname), c.oid::regclass)
         ELSE format('SELECT json_build_object(''sequence'', %L, ''value'', last_value) FROM %s',
                     format('%I.%I', n.nspname, c.relname), c.oid::regclass) END
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'S') AND c.relpersistence <> 't'
   AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\_toast%'
   AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
 ORDER BY n.nspname, c.relname
\gexec

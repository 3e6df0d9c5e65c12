#!/usr/bin/env bash
# Create or update one stage's login role and its database. The role's password is read from stdin.
#
#   PG_ROLE=katforge PG_DATABASE=katforge pg-database.sh < password
#
# PG_BIN_DIR      PostgreSQL's programs; default /usr/lib/postgresql/16/bin
# PG_LOCK_TIMEOUT, PG_LOCK_RETRIES, PG_LOCK_RETRY_DELAY
#                 how long one change of owner may wait for a table's lock (default 1s), how often the
#                 changes are tried (default 20), and the seconds between tries (default 3)
# PGHOST, PGPORT  libpq's usual settings, to reach the server's local socket.
#
# Runs as root and connects as the postgres OS user (peer). The password appears in no command line
# and never reaches the server: its SCRAM verifier is computed here, and only when the stored verifier
# does not already match it, so a second run changes nothing. The session that sets it logs no
# statement, whatever log_statement says. Only the role's own database admits it (CONNECT is revoked
# from PUBLIC), so a stage cannot log in to another stage's database; roles that could connect only
# through PUBLIC are listed, with the GRANT that gives it back.
#
# A database the apps used as postgres is adopted: the objects postgres owns in its schema public
# become the role's, so the apps keep their access when they switch to the role. Changing an owner
# takes a table's strongest lock, which waits for open transactions while the apps' queries queue
# behind it: each change waits PG_LOCK_TIMEOUT at most, and the changes are tried again until they are
# done or the tries run out, when the sessions holding the tables are named.
set -euo pipefail

log() { printf 'pg-database: %s\n' "$*" >&2; }

: "${PG_ROLE:?PG_ROLE is required}"
: "${PG_DATABASE:?PG_DATABASE is required}"
bin_dir=${PG_BIN_DIR:-/usr/lib/postgresql/16/bin}
lock_timeout=${PG_LOCK_TIMEOUT:-1s}
lock_retries=${PG_LOCK_RETRIES:-20}
lock_retry_delay=${PG_LOCK_RETRY_DELAY:-3}

# Runs the SQL on stdin as the superuser in the database $1, with :role, :database and :lock_timeout set.
psql_() {
  runuser -u postgres -- "$bin_dir/psql" -X -A -t -q -v ON_ERROR_STOP=1 -d "$1" \
    -v role="$PG_ROLE" -v database="$PG_DATABASE" -v lock_timeout="$lock_timeout"
}

# PostgreSQL prepares non-ASCII passwords (SASLprep) before hashing them; printable ASCII needs no
# preparation, so the verifier computed below is exactly the server's.
printable_ascii() {
  local LC_ALL=C
  [[ $1 =~ ^[[:print:]]+$ ]]
}

IFS= read -r password || true
if ! printable_ascii "$password"; then
  log "the password on stdin must be one line of printable ASCII"
  exit 2
fi

stored=$(psql_ postgres <<<"SELECT rolpassword FROM pg_authid WHERE rolname = :'role'")

# A new SCRAM-SHA-256 verifier for the password, or nothing when the stored one already verifies it.
verifier=$(KATFORGE_PASSWORD=$password KATFORGE_STORED=$stored python3 - <<'PY'
import base64, hashlib, hmac, os, re

password = os.environ["KATFORGE_PASSWORD"].encode()


def keys(salt: bytes, iterations: int) -> bytes:
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return hashlib.sha256(client_key).digest() + hmac.new(salted, b"Server Key", "sha256").digest()


stored = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)", os.environ["KATFORGE_STORED"])
if stored:
    iterations, salt, stored_key, server_key = stored.groups()
    decode = base64.b64decode
    if hmac.compare_digest(keys(decode(salt), int(iterations)), decode(stored_key) + decode(server_key)):
        raise SystemExit
salt = os.urandom(16)
derived = keys(salt, 4096)
encode = lambda value: base64.b64encode(value).decode()
print(f"SCRAM-SHA-256$4096:{encode(salt)}${encode(derived[:32])}:{encode(derived[32:])}")
PY
)
export KATFORGE_VERIFIER=$verifier

# psql quotes :"name" as an identifier and :'name' as a literal; \if runs only what is missing.
psql_ postgres <<'SQL'
\getenv verifier KATFORGE_VERIFIER
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') AS create_role,
       EXISTS (SELECT FROM pg_roles WHERE rolname = :'role' AND NOT rolcanlogin) AS grant_login,
       :'verifier' <> '' AS set_password \gset
-- The verifier is no password, but whoever reads it can try passwords against it offline: the
-- statements that carry it stay out of the server log, whatever log_statement says.
SET log_statement = 'none';
SET log_min_duration_statement = -1;
SET log_min_error_statement = 'panic';
\if :create_role
  CREATE ROLE :"role" LOGIN PASSWORD :'verifier';
  \echo pg-database: created role :role
\else
  \if :grant_login
    ALTER ROLE :"role" LOGIN;
    \echo pg-database: role :role may log in
  \endif
  \if :set_password
    ALTER ROLE :"role" PASSWORD :'verifier';
    \echo pg-database: new password for role :role
  \endif
\endif
RESET log_statement;
RESET log_min_duration_statement;
RESET log_min_error_statement;

SELECT NOT EXISTS (SELECT FROM pg_database WHERE datname = :'database') AS create_database \gset
\if :create_database
  CREATE DATABASE :"database" OWNER :"role";
  \echo pg-database: created database :database
\endif
SELECT pg_get_userbyid(datdba) <> :'role' AS set_owner,
       has_database_privilege('public', oid, 'CONNECT') AS public_connect
  FROM pg_database WHERE datname = :'database' \gset
\if :set_owner
  ALTER DATABASE :"database" OWNER TO :"role";
  \echo pg-database: database :database now owned by :role
\endif
\if :public_connect
  SELECT coalesce(string_agg(quote_ident(rolname), ' ' ORDER BY rolname), '') AS could_connect
    FROM pg_roles WHERE rolcanlogin AND NOT rolsuper AND rolname <> :'role'
     AND has_database_privilege(oid, :'database', 'CONNECT') \gset
  REVOKE CONNECT ON DATABASE :"database" FROM PUBLIC;
  \echo pg-database: only the owner and superusers may connect to :database
  SELECT coalesce(string_agg(rolname, ' ' ORDER BY rolname), '') AS lost,
         count(*) > 0 AS any_lost
    FROM pg_roles WHERE rolname = ANY (string_to_array(:'could_connect', ' '))
     AND NOT has_database_privilege(oid, :'database', 'CONNECT') \gset
  \if :any_lost
    \echo pg-database: these roles could connect to :database through PUBLIC and no longer can: :lost
    \echo pg-database: give one access again with: GRANT CONNECT ON DATABASE :"database" TO <role>;
  \endif
\endif
SQL

# REASSIGN OWNED BY postgres is refused (postgres owns the system catalogs): each object is altered on
# its own. Sequences that belong to a table's column follow their table, array types their element
# type, and an extension's members stay its own. Range types stay postgres's (whether their multirange
# follows differs between 16.x releases): PUBLIC may use them all the same.
# \gexec runs each column of each row: the ALTER, then a SELECT that reports it.
ownership_sql=$(cat <<'SQL'
SET lock_timeout = :'lock_timeout';
SELECT format('ALTER %s %s OWNER TO %I', kind, name, :'role'),
       format('SELECT %L', format('pg-database: %s %s now owned by %s', lower(kind), name, :'role'))
  FROM (SELECT CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                              WHEN 'S' THEN 'SEQUENCE' WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END,
               c.oid::regclass::text, c.oid, 'pg_class'::regclass
          FROM pg_class c
         WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
           AND NOT EXISTS (SELECT FROM pg_depend d
                            WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                              AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i'))
           AND c.relnamespace = to_regnamespace('public') AND c.relowner = 'postgres'::regrole
        UNION ALL
        SELECT CASE p.prokind WHEN 'p' THEN 'PROCEDURE' WHEN 'a' THEN 'AGGREGATE' ELSE 'FUNCTION' END,
               p.oid::regprocedure::text, p.oid, 'pg_proc'::regclass
          FROM pg_proc p
         WHERE p.pronamespace = to_regnamespace('public') AND p.proowner = 'postgres'::regrole
        UNION ALL
        SELECT CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END, t.oid::regtype::text, t.oid, 'pg_type'::regclass
          FROM pg_type t
         WHERE t.typtype IN ('c', 'd', 'e')
           AND (t.typrelid = 0 OR (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c')
           AND t.typnamespace = to_regnamespace('public') AND t.typowner = 'postgres'::regrole
       ) AS owned_by_postgres (kind, name, object, catalog)
 WHERE NOT EXISTS (SELECT FROM pg_depend e WHERE e.classid = catalog AND e.objid = object AND e.deptype = 'e')
 ORDER BY kind, name
\gexec
SQL
)
# The sessions holding a lock on a table that postgres still owns: what a change of owner waits for.
holders_sql=$(cat <<'SQL'
SELECT format('%s: pid %s, user %s, application %s, %s, transaction open since %s',
              l.relation::regclass, a.pid, a.usename, coalesce(nullif(a.application_name, ''), '-'), a.state,
              date_trunc('second', a.xact_start))
  FROM pg_locks l JOIN pg_stat_activity a USING (pid)
 WHERE l.granted AND a.pid <> pg_backend_pid() AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.relation IN (SELECT oid FROM pg_class WHERE relnamespace = to_regnamespace('public') AND relowner = 'postgres'::regrole)
 ORDER BY 1
SQL
)
errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
for attempt in $(seq 1 "$lock_retries"); do
  # What is done stays done: a try starts where the previous one stopped.
  if psql_ "$PG_DATABASE" <<<"$ownership_sql" 2>"$errors"; then
    exit 0
  fi
  if ! grep -q 'lock timeout' "$errors"; then
    cat "$errors" >&2
    exit 1
  fi
  if [[ $attempt -lt $lock_retries ]]; then
    log "a table is in use (try $attempt of $lock_retries); trying again in ${lock_retry_delay}s"
    sleep "$lock_retry_delay"
  fi
done
log "the owner of these tables could not change within $lock_retries tries of $lock_timeout each; the apps were"
log "not blocked for longer than that. Sessions holding them:"
psql_ "$PG_DATABASE" <<<"$holders_sql" | sed 's/^/  /' >&2
log "Run this again when they are done (the changes already made stay)."
exit 1

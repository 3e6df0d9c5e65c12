#!/usr/bin/env bash
# Create or update one stage's login role and its database. The role's password is read from stdin.
#
#   PG_ROLE=katforge PG_DATABASE=katforge pg-database.sh < password
#
# PG_BIN_DIR      PostgreSQL's programs; default /usr/lib/postgresql/16/bin
# PGHOST, PGPORT  libpq's usual settings, to reach the server's local socket.
#
# Runs as root and connects as the postgres OS user (peer). The password appears in no command line
# and never reaches the server: its SCRAM verifier is computed here, and only when the stored verifier
# does not already match it, so a second run changes nothing. Only the role's own database admits it
# (CONNECT is revoked from PUBLIC), so a stage cannot log in to another stage's database.
#
# A database the apps used as postgres is adopted: the objects postgres owns in its schema public
# become the role's, so the apps keep their access when they switch to the role.
set -euo pipefail

log() { printf 'pg-database: %s\n' "$*" >&2; }

: "${PG_ROLE:?PG_ROLE is required}"
: "${PG_DATABASE:?PG_DATABASE is required}"
bin_dir=${PG_BIN_DIR:-/usr/lib/postgresql/16/bin}

# Runs the SQL on stdin as the superuser in the database $1, with :role and :database set.
psql_() {
  runuser -u postgres -- "$bin_dir/psql" -X -A -t -q -v ON_ERROR_STOP=1 -d "$1" \
    -v role="$PG_ROLE" -v database="$PG_DATABASE"
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
  REVOKE CONNECT ON DATABASE :"database" FROM PUBLIC;
  \echo pg-database: only the owner and superusers may connect to :database
\endif
SQL

# REASSIGN OWNED BY postgres is refused (postgres owns the system catalogs): each object is altered on
# its own. Sequences that belong to a table's column follow their table, array types their element
# type, and an extension's members stay its own. Range types stay postgres's (whether their multirange
# follows differs between 16.x releases): PUBLIC may use them all the same.
# \gexec runs each column of each row: the ALTER, then a SELECT that reports it.
psql_ "$PG_DATABASE" <<'SQL'
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

#!/usr/bin/env bash
# Create or update one stage's login role and its database on RDS, as RDS's master user. The role's
# password is read from stdin.
#
#   PG_ROLE=katforge PG_DATABASE=katforge RDS_ENDPOINT=<address> rds-database.sh < password
#
# RDS_ENV_FILE    libpq's settings for RDS as the master user (PGHOST, PGPORT, PGUSER, PGSSLMODE, PGPASSFILE,
#                 written by Pulumi, infra/database.py); default /etc/katforge/rds.env. Its PGHOST must be
#                 RDS_ENDPOINT: a file left from another instance is refused.
# PG_BIN_DIR      PostgreSQL's programs; default /usr/lib/postgresql/16/bin
#
# The master user is no superuser (RDS has none; it is a member of rds_superuser, with CREATEROLE and
# CREATEDB). A second run changes nothing: the role's password is first tried by logging in with it, and
# set only when that fails, as a SCRAM verifier computed here, so the password itself never reaches the
# server or its log, and is in no command line (it goes to psql's environment only for the login). The
# master user is made a member of the role: the migration restores the stage's objects as the role
# (tools/migrate_database.py). Only the role's own database admits it (CONNECT revoked from PUBLIC).
set -euo pipefail

log() { printf 'rds-database: %s\n' "$*" >&2; }

: "${PG_ROLE:?PG_ROLE is required}"
: "${PG_DATABASE:?PG_DATABASE is required}"
: "${RDS_ENDPOINT:?RDS_ENDPOINT is required}"
bin_dir=${PG_BIN_DIR:-/usr/lib/postgresql/16/bin}
env_file=${RDS_ENV_FILE:-/etc/katforge/rds.env}

set -a
# shellcheck source=/dev/null
. "$env_file"
set +a
if [[ ${PGHOST:-} != "$RDS_ENDPOINT" ]]; then
  log "$env_file points at ${PGHOST:-nothing}, not at $RDS_ENDPOINT; nothing was changed (pulumi up writes it)"
  exit 1
fi

printable_ascii() {
  local LC_ALL=C
  [[ $1 =~ ^[[:print:]]+$ ]]
}
IFS= read -r password || true
if ! printable_ascii "$password"; then
  log "the password on stdin must be one line of printable ASCII"
  exit 2
fi

# As the master user, with :role, :database (and :verifier) set; the SQL comes on stdin.
psql_() {
  "$bin_dir/psql" -X -A -t -q -v ON_ERROR_STOP=1 -d "$1" -v role="$PG_ROLE" -v database="$PG_DATABASE" "${@:2}"
}

psql_ postgres <<'SQL'
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') AS missing \gset
\if :missing
  CREATE ROLE :"role" LOGIN;
  \echo created role :role
\endif
-- CREATEROLE gave the master user ADMIN on the roles it made; membership lets it own and restore as the role.
SELECT NOT pg_has_role(current_user, :'role', 'SET') AS not_member \gset
\if :not_member
  GRANT :"role" TO CURRENT_USER;
\endif
SELECT NOT EXISTS (SELECT FROM pg_database WHERE datname = :'database') AS missing \gset
\if :missing
  CREATE DATABASE :"database" OWNER :"role";
  \echo created database :database
\endif
REVOKE CONNECT ON DATABASE :"database" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"database" TO :"role";
SQL

if PGUSER=$PG_ROLE PGPASSWORD=$password PGPASSFILE=/dev/null \
    "$bin_dir/psql" -X -At -d "$PG_DATABASE" -c 'SELECT 1' >/dev/null 2>&1; then
  log "role $PG_ROLE logs in to $PG_DATABASE with its password: unchanged"
  exit 0
fi
# RFC 5802 / RFC 7677, as PostgreSQL stores it: SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>.
verifier=$(KATFORGE_PASSWORD=$password python3 - <<'PY'
import base64, hashlib, hmac, os

iterations, salt = 4096, os.urandom(16)
salted = hashlib.pbkdf2_hmac("sha256", os.environ["KATFORGE_PASSWORD"].encode(), salt, iterations)
key = lambda name: hmac.new(salted, name, "sha256").digest()
b64 = lambda raw: base64.b64encode(raw).decode()
print(f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(hashlib.sha256(key(b'Client Key')).digest())}:{b64(key(b'Server Key'))}")
PY
)
psql_ postgres -v verifier="$verifier" <<'SQL'
ALTER ROLE :"role" PASSWORD :'verifier';
SQL
log "set the password of role $PG_ROLE"

#!/usr/bin/env bash
# Restore one dump made by backup-databases.sh into a PostgreSQL database.
#
#   BACKUP_BUCKET=bucket restore-database.sh --stage STAGE --at YYYYMMDDTHHMMSSZ|latest --target DATABASE
#                                            [--database SOURCE] [--force]
#
# --database  the dumped database (the <database> in <stage>/<database>/); found in the bucket when the
#             stage holds dumps of a single database.
# --force     restore into a database that already holds objects: the objects in the dump replace
#             their namesakes, in one transaction (objects absent from the dump are kept).
# Without --force a non-empty target is refused and left untouched. A missing target is created.
#
# PostgreSQL: the libpq PG* environment (PGHOST, PGPORT, PGUSER, PGPASSWORD); a superuser or the owner
# of the dumped objects. AWS: the operator's own credentials (s3:ListBucket, s3:GetObject).
set -euo pipefail

log() { printf 'katforge-restore: %s\n' "$*" >&2; }
usage() {
  log "usage: BACKUP_BUCKET=bucket $0 --stage STAGE --at YYYYMMDDTHHMMSSZ|latest --target DATABASE [--database SOURCE] [--force]"
  exit 2
}

stage='' at='' target='' database='' force=''
while [[ $# -gt 0 ]]; do
  case $1 in
    --stage) stage=${2-} ;;
    --at) at=${2-} ;;
    --target) target=${2-} ;;
    --database) database=${2-} ;;
    --force) force=1; shift; continue ;;
    *) usage ;;
  esac
  shift 2 || usage
done
name='^[A-Za-z0-9_-]+$'
[[ $stage =~ $name && $target =~ $name && ( -z $database || $database =~ $name ) ]] || usage
[[ $at == latest || $at =~ ^[0-9]{8}T[0-9]{6}Z$ ]] || usage
[[ -n ${BACKUP_BUCKET:-} ]] || usage

s3() { aws s3api "$1" --bucket "$BACKUP_BUCKET" "${@:2}"; }
# SQL goes through stdin, where psql interpolates :'variables' (it does not for -c).
sql() { psql -X -At -v ON_ERROR_STOP=1 --dbname="$1" "${@:2}"; }

# The target is checked first, so a refusal costs nothing and touches nothing.
exists=$(sql postgres -v db="$target" <<<"SELECT count(*) FROM pg_database WHERE datname = :'db';")
if [[ $exists == 1 && -z $force ]]; then
  non_empty=$(sql "$target" <<'SQL'
WITH user_schemas AS (
  SELECT oid, nspname FROM pg_namespace WHERE nspname <> 'information_schema' AND nspname NOT LIKE 'pg\_%')
SELECT EXISTS (SELECT FROM user_schemas WHERE nspname <> 'public')
    OR EXISTS (SELECT FROM pg_class WHERE relnamespace IN (SELECT oid FROM user_schemas))
    OR EXISTS (SELECT FROM pg_proc WHERE pronamespace IN (SELECT oid FROM user_schemas))
    OR EXISTS (SELECT FROM pg_type WHERE typnamespace IN (SELECT oid FROM user_schemas))
    OR EXISTS (SELECT FROM pg_extension WHERE extname <> 'plpgsql');
SQL
  )
  if [[ $non_empty == t ]]; then
    log "REFUSED: database $target is not empty; nothing changed (pass --force to restore over it)"
    exit 1
  fi
fi

if [[ -z $database ]]; then
  prefixes=$(s3 list-objects-v2 --prefix "$stage/" --delimiter / --query 'CommonPrefixes[].Prefix' --output text)
  read -r -a found <<<"$prefixes"
  if [[ ${#found[@]} -ne 1 || ${found[0]} == None ]]; then
    log "cannot tell which database to restore under $stage/ (found: $prefixes); pass --database"
    exit 1
  fi
  database=$(basename "${found[0]}")
fi

if [[ $at == latest ]]; then
  keys=$(s3 list-objects-v2 --prefix "$stage/$database/" --query 'Contents[].Key' --output text)
  # The timestamp in the name is when the dump was taken, and it sorts in time order.
  key=$(tr '\t' '\n' <<<"$keys" | { grep -E '/[0-9]{8}T[0-9]{6}Z\.dump$' || true; } | sort | tail -n 1)
  [[ -n $key ]] || { log "no dump under s3://$BACKUP_BUCKET/$stage/$database/"; exit 1; }
else
  key="$stage/$database/$at.dump"
fi

workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
aws s3 cp --only-show-errors "s3://$BACKUP_BUCKET/$key" "$workdir/dump"
pg_restore --list "$workdir/dump" >/dev/null  # a damaged archive stops here, before the target is touched

if [[ $exists != 1 ]]; then
  createdb -- "$target"
fi
options=(--exit-on-error --single-transaction)
if [[ -n $force ]]; then
  options+=(--clean --if-exists)
fi
pg_restore "${options[@]}" --dbname="$target" "$workdir/dump"
log "restored s3://$BACKUP_BUCKET/$key into database $target"

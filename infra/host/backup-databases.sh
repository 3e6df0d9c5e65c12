#!/usr/bin/env bash
# Dump databases with pg_dump (custom format) to s3://$BACKUP_BUCKET/<stage>/<database>/<UTC timestamp>.dump.
# Installed on the k3s host as /usr/local/sbin/katforge-backup and run daily by katforge-backup.timer.
#
#   BACKUP_BUCKET=bucket backup-databases.sh STAGE:DATABASE...
#
# BACKUP_RUN_AS  OS user that runs pg_dump over the local socket (peer auth, no password); default
#                postgres. Set it empty to run pg_dump as the caller with its PG* environment.
# BACKUP_LOCK    lock file that keeps two runs from overlapping; default /run/lock/katforge-backup.lock.
# AWS_*          the AWS CLI's usual settings; on the host the instance profile supplies credentials.
#
# Every database is attempted; the exit status is non-zero if any of them failed.
set -euo pipefail

log() { printf 'katforge-backup: %s\n' "$*" >&2; }

if [[ $# -eq 0 || -z "${BACKUP_BUCKET:-}" ]]; then
  log "usage: BACKUP_BUCKET=bucket $0 STAGE:DATABASE..."
  exit 2
fi
for target in "$@"; do
  if [[ ! $target =~ ^[a-z0-9-]+:[A-Za-z0-9_]+$ ]]; then
    log "bad target '$target': expected STAGE:DATABASE"
    exit 2
  fi
done
run_as=${BACKUP_RUN_AS-postgres}

exec 9>"${BACKUP_LOCK:-/run/lock/katforge-backup.lock}"
if ! flock --nonblock 9; then
  log "FAILED: another backup run holds the lock; not starting a second one"
  exit 75
fi

workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT

dump() {
  if [[ -n $run_as ]]; then
    runuser -u "$run_as" -- pg_dump "$@"
  else
    pg_dump "$@"
  fi
}

# The dump lands in a local file and is uploaded only after pg_dump succeeded: the writer may only
# PutObject, so a partial upload could never be taken back.
backup() {
  local stage=$1 database=$2 key file="$workdir/dump"
  key="$stage/$database/$(date -u +%Y%m%dT%H%M%SZ).dump"
  if ! dump --format=custom --dbname="$database" >"$file"; then
    log "FAILED $key: pg_dump failed; nothing uploaded"
    return 1
  fi
  if ! aws s3 cp --only-show-errors "$file" "s3://$BACKUP_BUCKET/$key"; then
    log "FAILED $key: upload failed"
    return 1
  fi
  log "ok $key ($(stat -c %s "$file") bytes)"
  rm -f "$file"
}

failed=0
for target in "$@"; do
  backup "${target%%:*}" "${target#*:}" || failed=1
done
exit "$failed"

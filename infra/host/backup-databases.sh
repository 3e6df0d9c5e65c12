#!/usr/bin/env bash
# Dump databases with pg_dump (custom format), streamed to s3://$BACKUP_BUCKET/<stage>/<database>/<UTC timestamp>.dump,
# then <UTC timestamp>.manifest.json beside it: the dump's sha256 and size, the database's own properties
# (owner, ACL, settings, encoding, the roles its objects name; a dump holds none of them) and every
# table's row count and checksum, read in the dump's own snapshot. A dump counts only once its manifest
# exists: restores and drills skip one without (infra/host/restore-database.sh).
# Installed on the k3s host as /usr/local/sbin/katforge-backup and run daily by katforge-backup.timer.
#
#   BACKUP_BUCKET=bucket backup-databases.sh STAGE:DATABASE...
#
# BACKUP_RUN_AS       OS user that runs pg_dump and psql over the local socket (peer auth, no password);
#                     default postgres. Set it empty to run them as the caller with its PG* environment.
# BACKUP_LOCK         lock file that keeps two runs from overlapping; default /run/lock/katforge-backup.lock.
# BACKUP_STATE_DIR    where each database's last success is noted for katforge-backup-watchdog, and where
#                     katforge-drill leaves its result; default /var/lib/katforge.
# BACKUP_LOCK_WAIT    how long the dump may wait for a table's lock (pg_dump --lock-wait-timeout); default 10s.
# BACKUP_TRIES, BACKUP_RETRY_DELAY
#                     how often a dump that could not lock its tables is tried (default 3), and the seconds
#                     between tries (default 300)
# KATFORGE_LIB_DIR    where table-checksums.sql is; default this script's directory, else /usr/local/lib/katforge.
# ALERT_COMMAND       what mails the failures (katforge-alert, infra/host/send-alert.py); default katforge-alert.
# AWS_*               the AWS CLI's usual settings; on the host the instance profile supplies credentials.
#
# Every database is attempted; the exit status is non-zero if any of them failed, and then the failures
# are mailed to the operators.
#
# The dump is never written to a file: it streams from pg_dump to S3 (the host's one volume holds the
# database), hashed on the way. A dump that fails midway makes the upload stop without completing, so
# no object appears; the writer cannot delete one. A dump waits at most BACKUP_LOCK_WAIT for each
# table's lock while holding the locks it already has, so a migration queued behind it waits no
# longer than that; once every lock is held, a migration still waits for the dump to end (pg_dump
# keeps its locks to the end): about 15 s per GiB of database (benchmarks/backup_throughput.py measured
# 66-72 MiB/s on 2 quiet cores, 56 MiB/s busy; README, RPO and RTO).
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
state_dir=${BACKUP_STATE_DIR:-/var/lib/katforge}
lock_wait=${BACKUP_LOCK_WAIT:-10s}
tries=${BACKUP_TRIES:-3}
retry_delay=${BACKUP_RETRY_DELAY:-300}
lib_dir=${KATFORGE_LIB_DIR:-$(dirname "$(readlink -f "$0")")}
[[ -f $lib_dir/table-checksums.sql ]] || lib_dir=/usr/local/lib/katforge

exec 9>"${BACKUP_LOCK:-/run/lock/katforge-backup.lock}"
if ! flock --nonblock 9; then
  log "FAILED: another backup run holds the lock; not starting a second one"
  exit 75
fi

failures=()
# A run that fails, or is stopped (systemd's TimeoutStartSec sends TERM), mails what failed.
# shellcheck disable=SC2329 # run by the EXIT trap
on_exit() {
  local status=$?
  if [[ $status -ne 0 ]]; then
    [[ ${#failures[@]} -gt 0 ]] || failures=("the backup run stopped early (exit status $status)")
    printf '%s\n' "${failures[@]}" "" "Journal: journalctl -u katforge-backup --since -1d" \
      | "${ALERT_COMMAND:-katforge-alert}" "backup FAILED" \
      || log "the failure could not be mailed (${ALERT_COMMAND:-katforge-alert} failed); see the journal"
  fi
}
trap on_exit EXIT
trap 'exit 143' TERM INT

as_postgres() {
  if [[ -n $run_as ]]; then
    runuser -u "$run_as" -- "$@"
  else
    "$@"
  fi
}
fail() {
  log "FAILED $1"
  failures+=("FAILED $1")
}

# Read once, as root (psql runs as postgres, who may not reach the file); without it no manifest can vouch.
if [[ ! -r $lib_dir/table-checksums.sql ]]; then
  fail "$lib_dir/table-checksums.sql cannot be read: no database was dumped"
  exit 1
fi
checksums_sql=$(<"$lib_dir/table-checksums.sql")

# s3://bucket/key holds exactly $2 bytes: an upload that reported an error may still have landed whole.
landed() {
  local length
  length=$(aws s3api head-object --bucket "$BACKUP_BUCKET" --key "$1" --query ContentLength --output text \
           2>/dev/null) && [[ $length == "$2" ]]
}

# Runs the dump command given as arguments and streams its output to the S3 URL in $1, printing
# "<sha256> <bytes>" of what it sent. Exit status: 0 uploaded, 3 the dump failed (the upload is killed
# before it sees the end of its input, so no object is created), 4 the dump succeeded but the upload
# reported an error, 5 the dump could not lock a table in time.
stream_upload() {
  python3 - "$@" <<'PY'
import hashlib, subprocess, sys, threading

url, *dump_command = sys.argv[1:]
upload = subprocess.Popen(["aws", "s3", "cp", "--only-show-errors", "-", url], stdin=subprocess.PIPE)
dump = subprocess.Popen(dump_command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
errors = []
def relay_errors():
    for line in dump.stderr:
        errors.append(line)
        sys.stderr.buffer.write(line)
        sys.stderr.flush()
reader = threading.Thread(target=relay_errors)
reader.start()
digest, size, upload_ended = hashlib.sha256(), 0, False
while chunk := dump.stdout.read(1 << 20):
    digest.update(chunk)
    size += len(chunk)
    try:
        upload.stdin.write(chunk)
    except BrokenPipeError:
        upload_ended = True
        dump.kill()
        break
status = dump.wait()
reader.join()
if status != 0 or upload_ended:
    upload.kill()  # before its input closes: an upload that saw the end of its input would complete
    upload.wait()
    # pg_dump's lock wait is a statement timeout on its LOCK TABLE statement.
    sys.exit(5 if any(b"Query was: LOCK TABLE" in line for line in errors) else 3)
upload.stdin.close()
print(digest.hexdigest(), size)
sys.exit(0 if upload.wait() == 0 else 4)
PY
}

# The database's own properties and the roles its objects name, as JSON members (manifest.json).
DATABASE_SQL=$(cat <<'SQL'
SELECT jsonb_build_object(
  'name', d.datname, 'owner', pg_get_userbyid(d.datdba), 'size', pg_database_size(d.oid),
  'server_version', current_setting('server_version'),
  'encoding', pg_encoding_to_char(d.encoding), 'collate', d.datcollate, 'ctype', d.datctype,
  'locale_provider', d.datlocprovider, 'icu_locale', d.daticulocale, 'connection_limit', d.datconnlimit,
  'comment', shobj_description(d.oid, 'pg_database'),
  'acl', (SELECT json_agg(json_build_object('grantee', CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END,
                                            'privilege', a.privilege_type, 'grantable', a.is_grantable)
                          ORDER BY a.grantee, a.privilege_type)
            FROM aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a),
  'settings', (SELECT coalesce(json_agg(json_build_object('role', pg_get_userbyid(nullif(s.setrole, 0)), 'setting', c)
                                        ORDER BY s.setrole, c), '[]')
                 FROM pg_db_role_setting s, unnest(s.setconfig) c WHERE s.setdatabase = d.oid),
  'roles', (SELECT coalesce(json_agg(DISTINCT r.rolname), '[]')
              FROM pg_roles r
             WHERE r.oid = d.datdba
                OR r.oid IN (SELECT refobjid FROM pg_shdepend
                              WHERE refclassid = 'pg_authid'::regclass
                                AND (dbid = d.oid OR (classid = 'pg_database'::regclass AND objid = d.oid)))
                OR r.oid IN (SELECT setrole FROM pg_db_role_setting WHERE setdatabase = d.oid)),
  'extensions', (SELECT coalesce(json_agg(json_build_object('name', extname, 'version', extversion) ORDER BY extname), '[]')
                   FROM pg_extension))
FROM pg_database d WHERE d.datname = current_database();
SQL
)

# One attempt: 0 done, 1 failed, 2 a table stayed locked (worth another try).
attempt() {
  local stage=$1 database=$2 key=$3 snapshot dumped sha size status=0 manifest line lines=()
  # The session that exports the snapshot pg_dump reads, and reads the manifest in it meanwhile. It
  # keeps the transaction open until pg_dump is done (pg_dump imports the snapshot as it starts): a
  # failed manifest query rolls back to a savepoint, not out of the transaction (no ON_ERROR_STOP).
  coproc SNAPSHOT { as_postgres psql -X -q -At --dbname="$database"; }
  local to=${SNAPSHOT[1]} from=${SNAPSHOT[0]} pid=$SNAPSHOT_PID
  printf '%s\n' "SET idle_in_transaction_session_timeout = 0;" "SET lock_timeout = '$lock_wait';" \
    "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;" "SELECT pg_export_snapshot();" >&"$to"
  if ! read -r -t 60 -u "$from" snapshot || [[ -z $snapshot ]]; then
    fail "$key: no snapshot of database $database (see the psql error above)"
    return 1
  fi
  printf '%s\n' "SAVEPOINT manifest;" "$DATABASE_SQL" "$checksums_sql" \
    "\\if :ERROR" "ROLLBACK TO SAVEPOINT manifest;" "\\echo FAILED" "\\endif" "\\echo END" >&"$to"

  dumped=$(stream_upload "s3://$BACKUP_BUCKET/$key.dump" "${dump_as[@]}" --format=custom \
           --lock-wait-timeout="$lock_wait" --snapshot="$snapshot" --dbname="$database") || status=$?
  while read -r -t 3600 -u "$from" line && [[ $line != END ]]; do
    lines+=("$line")
  done
  { printf 'COMMIT;\n\\q\n' >&"$to"; } 2>/dev/null || true
  wait "$pid" || true

  case $status in
    0 | 4) read -r sha size <<<"$dumped" ;;
    5) log "$key.dump: a table stayed locked for $lock_wait; nothing uploaded"; return 2 ;;
    *) fail "$key.dump: pg_dump failed; nothing uploaded"; return 1 ;;
  esac
  if [[ $status == 4 ]]; then
    if ! landed "$key.dump" "$size"; then
      fail "$key.dump: upload failed; no complete object"
      return 1
    fi
    log "$key.dump: the upload reported an error, but the whole object ($size bytes) is in the bucket"
  fi
  if [[ ${#lines[@]} -eq 0 || ${lines[0]} != "{"* || ${lines[-1]} == FAILED ]]; then
    log "$key.dump: uploaded, but its manifest could not be read from the database (see above); the dump does not count"
    return 2
  fi
  manifest=$(printf '{"format": 1, "dump": "%s", "sha256": "%s", "bytes": %s, "taken": "%s", "finished": "%s", "database": %s, "relations": [%s]}' \
             "$key.dump" "$sha" "$size" "${key##*/}" "$(date -u +%Y%m%dT%H%M%SZ)" "${lines[0]}" \
             "$(IFS=,; echo "${lines[*]:1}")")
  if ! aws s3 cp --only-show-errors - "s3://$BACKUP_BUCKET/$key.manifest.json" <<<"$manifest" \
      && ! landed "$key.manifest.json" "$(wc -c <<<"$manifest")"; then
    fail "$key.dump: uploaded, but its manifest $key.manifest.json was not; the dump does not count"
    return 1
  fi
  log "ok $key.dump ($size bytes, sha256 $sha)"
  mkdir -p "$state_dir/backup"
  printf '%s\n' "$key.dump" >"$state_dir/backup/$stage.$database.last-success"
  # The drill runs monthly and dumps expire after backupRetentionDays: its last result is published
  # again with each backup, so the bucket always holds it (hearth status reads it).
  local drill="$state_dir/drill/$stage.json"
  if [[ -f $drill ]]; then
    aws s3 cp --only-show-errors "$drill" "s3://$BACKUP_BUCKET/$stage/drill/latest.json" \
      || log "could not publish the last drill result $drill (the backup itself is done)"
  fi
}

dump_as=(pg_dump)
[[ -z $run_as ]] || dump_as=(runuser -u "$run_as" -- pg_dump)

backup() {
  local stage=$1 database=$2 key try status
  for try in $(seq 1 "$tries"); do
    key="$stage/$database/$(date -u +%Y%m%dT%H%M%SZ)"
    status=0
    attempt "$stage" "$database" "$key" || status=$?
    [[ $status == 2 ]] || return "$status"
    if [[ $try -lt $tries ]]; then
      log "$key: trying again in ${retry_delay}s (try $try of $tries)"
      sleep "$retry_delay"
    fi
  done
  fail "$key.dump: a table stayed locked for $lock_wait, or the manifest could not be read, in each of $tries tries"
  return 1
}

failed=0
for target in "$@"; do
  backup "${target%%:*}" "${target#*:}" || failed=1
done
exit "$failed"

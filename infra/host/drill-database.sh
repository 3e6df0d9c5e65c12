#!/usr/bin/env bash
# The restore drill: restore the stage's latest verified dump into a scratch database, compare every
# table's row count and checksum and every sequence with the manifest written when the dump was taken,
# report the measured restore time, and drop the scratch database. Installed on the k3s host as
# /usr/local/sbin/katforge-drill; katforge-drill@<stage>.timer runs it monthly, `make drill STAGE=...`
# on demand.
#
#   drill-database.sh --stage STAGE [--database SOURCE]
#
# The result, one JSON object, is kept in $BACKUP_STATE_DIR/drill/<stage>.json (default
# /var/lib/katforge) and in the bucket as <stage>/drill/latest.json, where `hearth status` reads it
# (each backup publishes it again, so it never expires from the bucket between monthly drills):
#   {"stage", "database", "dump", "ok", "error", "started", "seconds": {"download_and_verify",
#    "restore", "total"}, "database_bytes", "restore_mib_per_s", "tables", "sequences", "mismatches": [...]}
# A failed drill exits non-zero and mails the operators (ALERT_COMMAND, default katforge-alert).
# DRILL_LOCK: the lock that runs one drill at a time; default /run/lock/katforge-drill.lock.
#
# The restore is katforge-restore's own (RESTORE_COMMAND; default the restore-database.sh beside this
# script, else katforge-restore), as a superuser: see there. BACKUP_BUCKET and the rest come as for it.
set -euo pipefail

log() { printf 'katforge-drill: %s\n' "$*" >&2; }

stage='' database=''
while [[ $# -gt 0 ]]; do
  case $1 in
    --stage) stage=${2-} ;;
    --database) database=${2-} ;;
    *) log "usage: $0 --stage STAGE [--database SOURCE]"; exit 2 ;;
  esac
  shift 2 || { log "usage: $0 --stage STAGE [--database SOURCE]"; exit 2; }
done
[[ $stage =~ ^[a-z0-9-]+$ && ( -z $database || $database =~ ^[A-Za-z0-9_]+$ ) ]] \
  || { log "usage: $0 --stage STAGE [--database SOURCE]"; exit 2; }

here=$(dirname "$(readlink -f "$0")")
restore_command=${RESTORE_COMMAND:-$here/restore-database.sh}
[[ -f $restore_command ]] || restore_command=katforge-restore
lib_dir=${KATFORGE_LIB_DIR:-$here}
[[ -f $lib_dir/table-checksums.sql ]] || lib_dir=/usr/local/lib/katforge
state_dir=${BACKUP_STATE_DIR:-/var/lib/katforge}
default_run_as=''
[[ $EUID -ne 0 ]] || default_run_as=postgres
run_as=${RESTORE_RUN_AS-$default_run_as}
env_file=${KATFORGE_ENV_FILE:-/etc/katforge/backup.env}
if [[ -z ${BACKUP_BUCKET:-} && -r $env_file ]]; then
  BACKUP_BUCKET=$(sed -n 's/^BACKUP_BUCKET=//p' "$env_file")
fi
scratch="katforge_drill_${stage//-/_}"
work=$(mktemp -d)
started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
error=''

as_postgres() {
  if [[ -n $run_as ]]; then
    runuser -u "$run_as" -- "$@"
  else
    "$@"
  fi
}
drop_scratch() {
  as_postgres psql -X -q -v ON_ERROR_STOP=1 --dbname=postgres -v db="$scratch" \
    <<<'SET client_min_messages = warning; DROP DATABASE IF EXISTS :"db" WITH (FORCE);'
}
# shellcheck disable=SC2329 # run by the EXIT trap
finish() {
  local status=$?
  drop_scratch || log "could not drop the scratch database $scratch: drop it by hand"
  rm -rf "$work"
  exit "$status"
}
trap finish EXIT
trap 'exit 143' TERM INT

# One drill at a time (each stage's timer may fire together): the second waits.
exec 8>"${DRILL_LOCK:-/run/lock/katforge-drill.lock}"
flock 8
drop_scratch  # left by a drill that was killed
if "$restore_command" --stage "$stage" ${database:+--database "$database"} --at latest --target "$scratch" \
     --report "$work/report.json"; then
  # On stdin, opened by this script (root): psql runs as postgres, who may not reach the file.
  as_postgres psql -X -At -q -v ON_ERROR_STOP=1 --dbname="$scratch" <"$lib_dir/table-checksums.sql" \
    >"$work/restored.jsonl" || error="the checksums of the restored copy could not be read"
else
  error="the restore failed (see above)"
fi
drop_scratch

# The comparison and the result. Tables must match exactly (rows and checksum, both read in the dump's
# snapshot); a sequence may be ahead of the manifest, never behind: sequences are outside snapshots and
# pg_dump reads them after the manifest did.
summary=$(python3 - "$work" "$stage" "$started" "$error" <<'PY'
import json, os, sys

work, stage, started, error = sys.argv[1:]
result = {"stage": stage, "started": started, "ok": False, "error": error or None, "mismatches": []}
if not error:
    report = json.load(open(os.path.join(work, "report.json")))
    manifest = report["manifest"]
    restored = {}
    for line in open(os.path.join(work, "restored.jsonl")):
        item = json.loads(line)
        restored[item.get("table") or item["sequence"]] = item
    expected = {item.get("table") or item["sequence"]: item for item in manifest["relations"]}
    for name in sorted(expected.keys() | restored.keys()):
        want, got = expected.get(name), restored.get(name)
        if want is None or got is None:
            result["mismatches"].append(f"{name}: {'not in the manifest' if want is None else 'not restored'}")
        elif "table" in want and (want["rows"], want["checksum"]) != (got["rows"], got["checksum"]):
            result["mismatches"].append(f"{name}: {got['rows']} rows, checksum {got['checksum']}; the manifest "
                                        f"says {want['rows']} rows, checksum {want['checksum']}")
        elif "sequence" in want and got["value"] < want["value"]:
            result["mismatches"].append(f"{name}: at {got['value']}, behind the manifest's {want['value']}")
    size = manifest["database"]["size"]
    result.update(
        database=manifest["database"]["name"], dump=report["key"], seconds=report["seconds"], database_bytes=size,
        restore_mib_per_s=round(size / 2**20 / max(report["seconds"]["restore"], 0.001), 1),
        tables=sum("table" in i for i in expected.values()), sequences=sum("sequence" in i for i in expected.values()),
        ok=not result["mismatches"])
    if result["mismatches"]:
        result["error"] = f"{len(result['mismatches'])} tables or sequences differ from the manifest"
with open(os.path.join(work, "result.json"), "w") as out:
    json.dump(result, out)
if result["ok"]:
    s = result["seconds"]
    print(f"ok: {result['dump']} restored in {s['restore']:.1f} s ({result['restore_mib_per_s']} MiB/s of a "
          f"{result['database_bytes'] / 2**20:.0f} MiB database; {s['total']:.1f} s with the download and checks); "
          f"{result['tables']} tables and {result['sequences']} sequences match the manifest")
else:
    print("FAILED: " + result["error"] + "".join("\n  " + m for m in result["mismatches"]))
PY
)
mkdir -p "$state_dir/drill"
cp "$work/result.json" "$state_dir/drill/$stage.json"
aws s3 cp --only-show-errors "$work/result.json" "s3://$BACKUP_BUCKET/$stage/drill/latest.json" \
  || log "could not publish the result to s3://$BACKUP_BUCKET/$stage/drill/latest.json (kept in $state_dir/drill/$stage.json)"

log "$summary"
if [[ $summary != ok:* ]]; then
  printf '%s\n' "The restore drill of stage $stage failed:" "$summary" "" \
    "Journal: journalctl -u katforge-drill@$stage --since -1d" \
    | "${ALERT_COMMAND:-katforge-alert}" "restore drill FAILED ($stage)" \
    || log "the failure could not be mailed (${ALERT_COMMAND:-katforge-alert} failed)"
  exit 1
fi

#!/usr/bin/env bash
# Restore a dump made by backup-databases.sh, replacing a database whole.
#
#   restore-database.sh --stage STAGE --at YYYYMMDDTHHMMSSZ|latest --target DATABASE
#                       [--database SOURCE] [--force] [--stop-apps] [--report FILE]
#
# Who restores: a superuser. On the k3s host, as root (`sudo katforge-restore ...`), PostgreSQL's programs
# run as the postgres OS user over the local socket (peer, no password), as the backup's do, and the
# host's instance role reads the bucket. A dump holds objects of several owners (an extension such as
# vector, which only a superuser may create; objects a DBA owns), and its database has an owner, an ACL
# and settings: a stage's role can bring back none of those, a superuser all of them as they were.
#
#  1. Nothing is touched until the dump is verified: its manifest exists (a dump without one never
#     completed), its size and sha256 match the manifest's, pg_restore reads the whole archive (every
#     data block, not only the table of contents), and the extensions it needs are installable here.
#     `latest` is the newest dump that passes; every dump passed over is named, with the reason. A
#     download that fails (access denied, the network) stops the restore, with the AWS CLI's error.
#  2. The dump is restored into a new database, <target>__restore, with the dumped database's encoding,
#     locale, owner, ACL and settings. Roles that its objects name and this server lacks are created
#     NOLOGIN, and named.
#  3. The new database takes the target's name in one transaction; the database it replaces is kept as
#     <target>__before_<UTC timestamp> (drop it once satisfied). The target itself is never written to:
#     a refused, failed or killed restore leaves it as it was, and drops the new database.
#
# --database  the dumped database (the <database> in <stage>/<database>/); found in the bucket when the
#             stage holds dumps of a single database.
# --force     replace a target that holds objects (without it, such a target is refused, untouched).
# --stop-apps the rename needs the target to have no other session. Without this flag, a target with
#             other sessions is refused, naming them. With it, the stage's Deployments are scaled to 0
#             just before the rename and back to their replicas after it (kubectl: on the host, k3s's
#             own kubeconfig; elsewhere KUBECONFIG); sessions still open after RESTORE_SESSION_WAIT
#             seconds (default 60) are named, and the restore is refused.
# --report    write what was restored, with the manifest and the timings, as JSON (katforge-drill reads it).
#
# Environment: BACKUP_BUCKET, AWS_DEFAULT_REGION and STAGE_NAMESPACES ("stage:namespace ...") are read
# from /etc/katforge/backup.env (KATFORGE_ENV_FILE) unless set. RESTORE_RUN_AS: the OS user PostgreSQL's
# programs run as; default postgres when run as root, else none (the caller's PG* environment: a
# superuser). RESTORE_JOBS: pg_restore's parallel jobs (default 2, the host's cores). RESTORE_LOCK_TIMEOUT:
# the longest any statement waits for a lock (default 10s). The dump is downloaded under TMPDIR.
set -euo pipefail

log() { printf 'katforge-restore: %s\n' "$*" >&2; }
usage() {
  log "usage: $0 --stage STAGE --at YYYYMMDDTHHMMSSZ|latest --target DATABASE [--database SOURCE] [--force] [--stop-apps] [--report FILE]"
  exit 2
}

stage='' at='' target='' database='' force='' stop_apps='' report=''
while [[ $# -gt 0 ]]; do
  case $1 in
    --stage) stage=${2-} ;;
    --at) at=${2-} ;;
    --target) target=${2-} ;;
    --database) database=${2-} ;;
    --report) report=${2-} ;;
    --force) force=1; shift; continue ;;
    --stop-apps) stop_apps=1; shift; continue ;;
    *) usage ;;
  esac
  shift 2 || usage
done
name='^[A-Za-z0-9_-]+$'
[[ $stage =~ $name && $target =~ $name && ( -z $database || $database =~ $name ) ]] || usage
[[ $at == latest || $at =~ ^[0-9]{8}T[0-9]{6}Z$ ]] || usage
# The names derived from the target stay within PostgreSQL's 63 bytes.
[[ ${#target} -le 38 ]] || { log "target name $target is longer than 38 characters"; exit 2; }

env_file=${KATFORGE_ENV_FILE:-/etc/katforge/backup.env}
if [[ -r $env_file ]]; then
  while IFS='=' read -r key value; do
    case $key in
      BACKUP_BUCKET | AWS_DEFAULT_REGION | STAGE_NAMESPACES) [[ -n ${!key:-} ]] || export "$key=${value//\"/}" ;;
    esac
  done <"$env_file"
fi
[[ -n ${BACKUP_BUCKET:-} ]] || { log "BACKUP_BUCKET is not set (nor in $env_file)"; usage; }
namespace=''
if [[ -n $stop_apps ]]; then
  for pair in ${STAGE_NAMESPACES:-}; do
    [[ ${pair%%:*} != "$stage" ]] || namespace=${pair#*:}
  done
  [[ -n $namespace ]] || { log "--stop-apps: no namespace for stage $stage in STAGE_NAMESPACES (${STAGE_NAMESPACES:-not set})"; exit 2; }
fi
default_run_as=''
[[ $EUID -ne 0 ]] || default_run_as=postgres
run_as=${RESTORE_RUN_AS-$default_run_as}
jobs=${RESTORE_JOBS:-2}
session_wait=${RESTORE_SESSION_WAIT:-60}
export PGOPTIONS="${PGOPTIONS:-} -c lock_timeout=${RESTORE_LOCK_TIMEOUT:-10s}"
scratch="${target}__restore"
before="${target}__before_$(date -u +%Y%m%dT%H%M%SZ)"
started=$EPOCHREALTIME

as_postgres() {
  if [[ -n $run_as ]]; then
    runuser -u "$run_as" -- "$@"
  else
    "$@"
  fi
}
s3() { aws s3api "$1" --bucket "$BACKUP_BUCKET" "${@:2}"; }
# SQL goes through stdin, where psql interpolates :'variables' (it does not for -c).
sql() { as_postgres psql -X -At -q -v ON_ERROR_STOP=1 --dbname="$1" "${@:2}"; }
exists() { [[ $(sql postgres -v db="$1" <<<"SELECT count(*) FROM pg_database WHERE datname = :'db';") == 1 ]]; }
# Other clients' sessions on database $1, one line each (the rename ends autovacuum's by itself).
sessions() {
  sql postgres -v db="$1" <<'SQL'
SELECT format('pid %s, user %s, application %s, %s since %s', pid, usename, coalesce(nullif(application_name, ''), '-'),
              state, date_trunc('second', coalesce(xact_start, backend_start)))
  FROM pg_stat_activity WHERE datname = :'db' AND pid <> pg_backend_pid() AND backend_type = 'client backend'
 ORDER BY pid;
SQL
}

# What a signal or an error leaves behind is undone: the step running (pg_restore, the rename) is
# stopped with its process group, the new database dropped, the apps scaled back.
child='' created='' scaled=()
# shellcheck disable=SC2329 # run by the EXIT trap
cleanup() {
  local status=$?
  if [[ -n $child ]]; then
    kill -TERM -- "-$child" 2>/dev/null || true
    wait "$child" 2>/dev/null || true
  fi
  if [[ -n $created ]] && exists "$scratch"; then
    sql postgres -v db="$scratch" <<<'DROP DATABASE :"db" WITH (FORCE);' || log "could not drop $scratch: drop it by hand"
    log "dropped $scratch; database $target is as it was"
  fi
  [[ ${#scaled[@]} -eq 0 ]] || scale_back
  rm -rf "${workdir:-}"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP

# A long step runs as $run_as in a process group of its own, so that a signal to this script stops it
# too (bash runs a trap only once the foreground command ends; `wait` returns at once). `<&0` keeps
# the caller's stdin (a background command would read /dev/null).
run() {
  if [[ -n $run_as ]]; then
    setsid runuser -u "$run_as" -- "$@" <&0 &
  else
    setsid "$@" <&0 &
  fi
  child=$!
  wait "$child"
  local status=$?
  child=''
  return "$status"
}

superuser=$(sql postgres <<<"SELECT rolsuper FROM pg_roles WHERE rolname = current_user;")
if [[ $superuser != t ]]; then
  log "REFUSED: a restore needs a superuser, and this connection's role is none; nothing changed. Run it on the"
  log "k3s host as root: ssh ubuntu@k3s.katforge.com sudo katforge-restore --stage $stage --at $at --target $target ..."
  exit 2
fi

# The target is checked first, so a refusal costs nothing and touches nothing.
target_exists=''
if exists "$target"; then
  target_exists=1
  if [[ -z $force ]]; then
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
      log "REFUSED: database $target is not empty; nothing changed (pass --force to replace it)"
      exit 1
    fi
  fi
  others=$(sessions "$target")
  if [[ -n $others && -z $stop_apps ]]; then
    log "REFUSED: database $target has other sessions; nothing changed. Stop them, or pass --stop-apps to scale"
    log "the stage's apps to 0 for the switch-over and back. The sessions:"
    printf '  %s\n' "${others//$'\n'/$'\n'  }" >&2
    exit 1
  fi
fi

if [[ -z $database ]]; then
  prefixes=$(s3 list-objects-v2 --prefix "$stage/" --delimiter / --query 'CommonPrefixes[].Prefix' --output text)
  read -r -a found <<<"${prefixes//$stage\/drill\//}"
  if [[ ${#found[@]} -ne 1 || ${found[0]} == None ]]; then
    log "cannot tell which database to restore under s3://$BACKUP_BUCKET/$stage/ (found: $prefixes); pass --database"
    exit 1
  fi
  database=$(basename "${found[0]}")
fi

if [[ $at == latest ]]; then
  listed=$(s3 list-objects-v2 --prefix "$stage/$database/" --query 'Contents[].Key' --output text)
  # The timestamp in the name is when the dump was taken, and it sorts in time order.
  mapfile -t candidates < <(tr '\t' '\n' <<<"$listed" | { grep -E '/[0-9]{8}T[0-9]{6}Z\.dump$' || true; } | sort -r)
  [[ ${#candidates[@]} -gt 0 ]] || { log "no dump under s3://$BACKUP_BUCKET/$stage/$database/"; exit 1; }
else
  candidates=("$stage/$database/$at.dump")
fi

workdir=$(mktemp -d)
[[ -z $run_as ]] || chown "$run_as" "$workdir"  # pg_restore reads the dump as that user

# Reads the manifest ($1) and writes beside it what the restore needs from it: `facts` ("sha256 bytes
# database-size"), `extensions` (one name a line), and the SQL of `roles.sql`, and of `create.sql` and
# `properties.sql` for database $2 (quoted here: names and values are data).
MANIFEST_PY=$(cat <<'PY'
import json, os, sys

path, target = sys.argv[1], sys.argv[2]
manifest = json.load(open(path))
db = manifest["database"]
ident = lambda name: '"' + name.replace('"', '""') + '"'
literal = lambda value: "'" + value.replace("'", "''") + "'"
# Settings whose value is a list of names: stored flattened (`"$user", public`), set back as written
# (pg_dump, dumputils.c, makeAlterConfigCommand and variable_is_guc_list_quote).
LIST_SETTINGS = {"local_preload_libraries", "search_path", "session_preload_libraries", "shared_preload_libraries",
                 "temp_tablespaces", "unix_socket_directories"}
out = {"facts": [f"{manifest['sha256']} {manifest['bytes']} {db['size']}"],
       "extensions": [e["name"] for e in db["extensions"]], "roles.sql": [], "properties.sql": []}
for role in db["roles"]:
    out["roles.sql"].append(
        f"SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {literal(role)}) AS missing \\gset\n\\if :missing\n"
        f"  CREATE ROLE {ident(role)} NOLOGIN;\n"
        f"  \\warn katforge-restore: created role {role} (NOLOGIN, no membership): objects of the dump name it\n\\endif")
name = ident(target)
locale = f" LOCALE_PROVIDER icu ICU_LOCALE {literal(db['icu_locale'])}" if db["locale_provider"] == "i" else ""
out["create.sql"] = [f"CREATE DATABASE {name} OWNER {ident(db['owner'])} TEMPLATE template0 ENCODING {literal(db['encoding'])}"
                     f" LC_COLLATE {literal(db['collate'])} LC_CTYPE {literal(db['ctype'])}{locale}"
                     f" CONNECTION LIMIT {db['connection_limit']};"]
grantees = sorted({a["grantee"] for a in db["acl"]} | {db["owner"]})
out["properties.sql"].append(f"REVOKE ALL ON DATABASE {name} FROM "
                             + ", ".join("PUBLIC" if g == "PUBLIC" else ident(g) for g in grantees) + ";")
for a in db["acl"]:
    grantee = "PUBLIC" if a["grantee"] == "PUBLIC" else ident(a["grantee"])
    out["properties.sql"].append(f"GRANT {a['privilege']} ON DATABASE {name} TO {grantee}"
                                 + (" WITH GRANT OPTION;" if a["grantable"] else ";"))
for s in db["settings"]:
    setting, _, value = s["setting"].partition("=")
    value = value if setting.lower() in LIST_SETTINGS else literal(value)
    who = f"ROLE {ident(s['role'])} IN DATABASE" if s["role"] else "DATABASE"
    out["properties.sql"].append(f"ALTER {who} {name} SET {ident(setting)} = {value};")
if db["comment"] is not None:
    out["properties.sql"].append(f"COMMENT ON DATABASE {name} IS {literal(db['comment'])};")
for file, lines in out.items():
    with open(os.path.join(os.path.dirname(path), file), "w") as f:
        f.write("".join(line + "\n" for line in lines))
PY
)

# Checks one dump, downloading it and its manifest to $workdir; sets `reason` when it fails.
verify() {
  local key=$1 base=${1%.dump} sha bytes missing
  reason=''
  rm -f "$workdir"/*
  # Both in one run of the CLI (each start costs half a second). An object that is not there is simply
  # not copied; a failed call (access denied, the network) says nothing about the dump, so it is not
  # passed over for an older one: the restore stops, under the CLI's own error.
  if ! aws s3 cp --only-show-errors --recursive "s3://$BACKUP_BUCKET/${base%/*}/" "$workdir" --exclude '*' \
    --include "${base##*/}.dump" --include "${base##*/}.manifest.json"; then
    log "REFUSED: s3://$BACKUP_BUCKET/$key could not be downloaded (the AWS CLI's error is above); nothing changed"
    exit 1
  fi
  mv "$workdir/${base##*/}.dump" "$workdir/dump" 2>/dev/null || { reason="the dump is not in the bucket"; return 1; }
  if ! mv "$workdir/${base##*/}.manifest.json" "$workdir/manifest.json" 2>/dev/null; then
    reason="it has no manifest ${base##*/}.manifest.json: its backup never completed"
    return 1
  fi
  if ! python3 -c "$MANIFEST_PY" "$workdir/manifest.json" "$scratch"; then
    reason="its manifest is unreadable"
    return 1
  fi
  read -r sha bytes _ <"$workdir/facts"
  [[ -z $run_as ]] || chown "$run_as" "$workdir/dump"
  if [[ $(stat -c %s "$workdir/dump") != "$bytes" ]]; then
    reason="it holds $(stat -c %s "$workdir/dump") bytes, its manifest says $bytes"
    return 1
  fi
  if [[ $(sha256sum "$workdir/dump" | cut -d' ' -f1) != "$sha" ]]; then
    reason="its sha256 differs from the manifest's $sha"
    return 1
  fi
  if ! run pg_restore --file=/dev/null "$workdir/dump" 2>"$workdir/read-errors"; then
    reason="pg_restore cannot read it whole: $(tr '\n' ' ' <"$workdir/read-errors")"
    return 1
  fi
  missing=$(sql postgres -v wanted="$(tr '\n' ' ' <"$workdir/extensions")" <<'SQL'
SELECT string_agg(name, ' ') FROM unnest(string_to_array(trim(:'wanted'), ' ')) AS name
 WHERE name NOT IN (SELECT name FROM pg_available_extensions);
SQL
  )
  if [[ -n $missing ]]; then
    reason="this server cannot install the extensions it needs: $missing"
    return 1
  fi
}

download_started=$EPOCHREALTIME
key=''
for candidate in "${candidates[@]}"; do
  if verify "$candidate"; then
    key=$candidate
    break
  fi
  if [[ $at != latest ]]; then
    log "REFUSED: s3://$BACKUP_BUCKET/$candidate: $reason; nothing changed"
    exit 1
  fi
  log "passing over s3://$BACKUP_BUCKET/$candidate: $reason"
done
[[ -n $key ]] || { log "REFUSED: no dump under s3://$BACKUP_BUCKET/$stage/$database/ passes its checks; nothing changed"; exit 1; }
verified=$EPOCHREALTIME
log "verified s3://$BACKUP_BUCKET/$key (sha256, size, every block read)"

read -r _ _ database_size <"$workdir/facts"
data_directory=$(sql postgres <<<"SHOW data_directory;")
if [[ -d $data_directory ]]; then
  free=$(df --output=avail -B1 "$data_directory" | tail -n 1)
  if (( free < database_size * 12 / 10 )); then
    log "REFUSED: $data_directory has $free bytes free, the restored copy needs about $database_size more; nothing changed"
    exit 1
  fi
fi

if exists "$scratch"; then
  log "dropping $scratch, left by an interrupted restore"
  sql postgres -v db="$scratch" <<<'DROP DATABASE :"db" WITH (FORCE);'
fi
sql postgres <"$workdir/roles.sql"
created=1
sql postgres <"$workdir/create.sql"
run pg_restore --jobs="$jobs" --exit-on-error --dbname="$scratch" "$workdir/dump"
sql postgres <"$workdir/properties.sql"
restored=$EPOCHREALTIME

scale() {
  kubectl --namespace="$namespace" patch deployment "$1" --type=merge --patch="{\"spec\": {\"replicas\": $2}}" >/dev/null
}
# shellcheck disable=SC2329 # run by cleanup
scale_back() {
  local entry
  for entry in "${scaled[@]}"; do
    if scale "${entry% *}" "${entry#* }"; then
      log "scaled deployment $namespace/${entry% *} back to ${entry#* }"
    else
      log "could not scale deployment $namespace/${entry% *} back: kubectl -n $namespace scale deployment ${entry% *} --replicas=${entry#* }"
    fi
  done
  scaled=()
}

if [[ -n $target_exists ]]; then
  if [[ -n $stop_apps ]]; then
    deployments=$(kubectl --namespace="$namespace" get deployments \
                  --output=jsonpath='{range .items[?(@.spec.replicas>0)]}{.metadata.name} {.spec.replicas}{"\n"}{end}')
    while read -r deployment replicas; do
      [[ -n $deployment ]] || continue
      scaled+=("$deployment $replicas")
      scale "$deployment" 0
      log "scaled deployment $namespace/$deployment from $replicas to 0"
    done <<<"$deployments"
    for _ in $(seq 1 "$session_wait"); do
      [[ -n $(sessions "$target") ]] || break
      sleep 1
    done
  fi
  others=$(sessions "$target")
  if [[ -n $others ]]; then
    log "REFUSED: database $target still has other sessions; nothing changed. The sessions:"
    printf '  %s\n' "${others//$'\n'/$'\n'  }" >&2
    exit 1
  fi
  if ! run psql -X -q -v ON_ERROR_STOP=1 --dbname=postgres -v target="$target" -v scratch="$scratch" \
    -v before="$before" <<'SQL'
BEGIN;
ALTER DATABASE :"target" RENAME TO :"before";
ALTER DATABASE :"scratch" RENAME TO :"target";
COMMIT;
SQL
  then
    # The rename's lock on the database waits at most lock_timeout: name who holds one (from any database).
    holders=$(sql postgres -v db="$target" <<'SQL'
SELECT format('pid %s, user %s, database %s, application %s, %s since %s: %s', a.pid, a.usename, a.datname,
              coalesce(nullif(a.application_name, ''), '-'), a.state, date_trunc('second', a.xact_start), l.mode)
  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'object' AND l.classid = 'pg_database'::regclass AND l.granted
   AND l.objid = (SELECT oid FROM pg_database WHERE datname = :'db') AND l.pid <> pg_backend_pid()
 ORDER BY a.pid;
SQL
    ) || holders=''
    log "FAILED: the switch could not rename database $target${holders:+; sessions holding a lock on it:}"
    [[ -z $holders ]] || printf '  %s\n' "${holders//$'\n'/$'\n'  }" >&2
    exit 1
  fi
else
  sql postgres -v target="$target" -v scratch="$scratch" <<<'ALTER DATABASE :"scratch" RENAME TO :"target";'
fi
created=''
[[ ${#scaled[@]} -eq 0 ]] || scale_back
finished=$EPOCHREALTIME

if [[ -n $report ]]; then
  python3 - "$workdir/manifest.json" "$key" "$target" "$download_started" "$verified" "$restored" "$finished" \
    >"$report" <<'PY'
import json, sys
manifest, key, target, *times = sys.argv[1:]
start, verified, restored, finished = (float(t) for t in times)
print(json.dumps({"key": key, "target": target, "manifest": json.load(open(manifest)),
                  "seconds": {"download_and_verify": round(verified - start, 3), "restore": round(restored - verified, 3),
                              "total": round(finished - start, 3)}}))
PY
fi
log "restored s3://$BACKUP_BUCKET/$key into database $target in $(python3 -c "print(round($finished - $started, 1))") s"
# The drop as a shell command, run where this ran, as the README's runbook has it (names are [A-Za-z0-9_-]).
[[ -z $target_exists ]] || log "the database it replaced is kept as $before: drop it once satisfied (sudo -u postgres dropdb -- $before)"

#!/usr/bin/env bash
# Configure PostgreSQL 16: conf.d/katforge.conf (the listen addresses plus the settings read from
# stdin) and pg_hba.conf (peer for the postgres OS user, scram-sha-256 for the client networks).
#
#   PG_LISTEN_ADDRESSES=localhost,172.31.14.98 PG_CLIENT_CIDRS="10.0.0.0/8 172.16.0.0/12" \
#     pg-configure.sh < postgresql-katforge.conf
#
# PG_CONF_DIR         the cluster's configuration directory; default /etc/postgresql/16/main
# PG_BIN_DIR          PostgreSQL's programs; default /usr/lib/postgresql/16/bin
# PG_RESTART_COMMAND  restarts the server when a changed setting needs it (shared_buffers...);
#                     default "systemctl restart postgresql@16-main"
# PGHOST, PGPORT      libpq's usual settings, to reach the server's local socket.
#
# Runs as root. Identical files change nothing: no reload, no restart. A changed candidate is swapped
# in and checked by PostgreSQL itself (the server's own parser on the configuration files, and the
# pg_hba_file_rules view) BEFORE the server reloads; a rejected candidate is swapped back out, so the
# running configuration stays in place, and the step fails with PostgreSQL's message.
set -euo pipefail

log() { printf 'pg-configure: %s\n' "$*" >&2; }

: "${PG_LISTEN_ADDRESSES:?PG_LISTEN_ADDRESSES is required, e.g. localhost,172.31.14.98}"
: "${PG_CLIENT_CIDRS:?PG_CLIENT_CIDRS is required: the client networks in CIDR form, space-separated}"
conf_dir=${PG_CONF_DIR:-/etc/postgresql/16/main}
bin_dir=${PG_BIN_DIR:-/usr/lib/postgresql/16/bin}
read -ra client_cidrs <<<"$PG_CLIENT_CIDRS"
read -ra restart <<<"${PG_RESTART_COMMAND:-systemctl restart postgresql@16-main}"

# The superuser connects as the postgres OS user, the only one pg_hba admits over the socket.
sql() { runuser -u postgres -- "$bin_dir/psql" -X -A -t -q -v ON_ERROR_STOP=1 -d postgres -c "$1"; }

main_conf=$conf_dir/postgresql.conf
# The server's owner: it must be able to read every file written here.
owner=$(stat -c %U "$main_conf")
# Assigned on its own: errexit sees a failed command substitution only in a plain assignment.
hba_file=$(sql 'SHOW hba_file')
declare -A target=([katforge.conf]="$conf_dir/conf.d/katforge.conf" [pg_hba.conf]="$hba_file")

# Candidates and backups live beside the targets, so that swapping is an atomic rename.
work=$(mktemp -d "$conf_dir/.katforge.XXXXXX")
trap 'rm -rf "$work"' EXIT

{
  echo "# Managed by katforge (infra/host/pg-configure.sh): changes made here are overwritten."
  echo "listen_addresses = '$PG_LISTEN_ADDRESSES'"
  cat
} >"$work/katforge.conf"

{
  echo "# Managed by katforge (infra/host/pg-configure.sh): changes made here are overwritten."
  echo "# TYPE  DATABASE  USER      ADDRESS          METHOD"
  echo "# Administration and backups: the postgres OS user over the local socket, no password."
  echo "local   all       postgres                   peer"
  echo "# Pods, container networks and the VPC: a password, checked with SCRAM."
  for cidr in "${client_cidrs[@]}"; do
    printf 'host    all       all       %-16s scram-sha-256\n' "$cidr"
  done
} >"$work/pg_hba.conf"

changed=()
for name in "${!target[@]}"; do
  cmp -s "$work/$name" "${target[$name]}" || changed+=("$name")
done
if [[ ${#changed[@]} -eq 0 ]]; then
  log "configuration unchanged"
  exit 0
fi

swap_in() {
  local name
  for name in "${changed[@]}"; do
    if [[ -e ${target[$name]} ]]; then
      cp -p "${target[$name]}" "$work/$name.old"
      chmod --reference="${target[$name]}" "$work/$name"
    else
      chmod 0644 "$work/$name"
    fi
    chown --reference="$main_conf" "$work/$name"
    mv "$work/$name" "${target[$name]}"
  done
}

swap_out() {
  local name
  for name in "${changed[@]}"; do
    if [[ -e $work/$name.old ]]; then
      mv "$work/$name.old" "${target[$name]}"
    else
      rm -f "${target[$name]}"
    fi
  done
}

# Prints PostgreSQL's complaints about the files now on disk; fails if there are any, or if it could
# not ask. It runs in an if's condition, where errexit is off: each step's status is tested here.
check() {
  local errors
  # The server's own startup parser, on postgresql.conf and everything it includes.
  if ! errors=$(runuser -u "$owner" -- "$bin_dir/postgres" -D "$conf_dir" -C data_directory 2>&1 >/dev/null); then
    printf '%s\n' "$errors"
    return 1
  fi
  if ! errors=$(sql "SELECT format('%s line %s: %s', file_name, line_number, error)
                     FROM pg_hba_file_rules WHERE error IS NOT NULL" 2>&1) || [[ -n $errors ]]; then
    printf '%s\n' "$errors"
    return 1
  fi
}

swap_in
if ! problems=$(check); then
  swap_out
  log "rejected ${changed[*]}; the running configuration is unchanged. PostgreSQL says:"
  printf '%s\n' "$problems" >&2
  exit 1
fi

loaded=$(sql "SELECT pg_conf_load_time()")
sql "SELECT pg_reload_conf()" >/dev/null
# The postmaster reloads asynchronously; new sessions see the new settings once it has.
for _ in {1..50}; do
  [[ $(sql "SELECT pg_conf_load_time()") != "$loaded" ]] && break
  sleep 0.1
done
log "reloaded with new ${changed[*]}"

pending=$(sql "SELECT string_agg(name, ', ' ORDER BY name) FROM pg_settings WHERE pending_restart")
if [[ -n $pending ]]; then
  log "restarting for $pending"
  "${restart[@]}"
fi

#!/usr/bin/env bash
# Configure PostgreSQL 16: conf.d/katforge.conf (the listen addresses plus the settings read from
# stdin) and pg_hba.conf (Ubuntu's defaults, plus scram-sha-256 for the client networks).
#
#   PG_LISTEN_ADDRESSES=localhost,172.31.14.98 PG_CLIENT_CIDRS="10.0.0.0/8 172.16.0.0/12" \
#     pg-configure.sh < postgresql-katforge.conf
#
# PG_CONF_DIR         the cluster's configuration directory; default /etc/postgresql/16/main
# PG_BIN_DIR          PostgreSQL's programs; default /usr/lib/postgresql/16/bin
# PG_ALLOW_RESTART    1 (or true, yes) to restart the server when a setting needs it (shared_buffers,
#                     max_connections, listen_addresses...); otherwise such a run fails, naming them
# PG_RESTART_COMMAND  how to restart; default "systemctl restart postgresql@16-main"
# PG_DROP_LIVE_HBA_RULES  1 (or true, yes) to replace a live pg_hba.conf whose rules admit connections
#                     the new one would not; otherwise such a run fails, naming those rules
# KATFORGE_RESTART_LOCK  held while the server restarts, so that k3s (k3s-install.sh takes it too)
#                     never restarts at the same time; default /run/lock/katforge-restart.lock
# KATFORGE_RESTART_LOCK_WAIT  seconds to wait for it; default 900
# PGHOST, PGPORT      libpq's usual settings, to reach the server's local socket.
# PG_CHECK_ONLY       a directory of facts read on the host (`make preflight` writes it from `make discover`,
#                     tools/preflight.py): decide whether a run would refuse before changing anything (md5
#                     roles, live pg_hba rules), exactly as a run does, and change nothing. What the server
#                     would answer is in its files: `hba_file` (the path of pg_hba.conf, under PG_CONF_DIR's
#                     tree), `md5-roles`, `live-rules.json`. Settings waiting for a restart and settings a
#                     later file overrides are not decided here (they need the server). Exits as a refusing run
#                     would, else 0.
#
# Runs as root. Identical files change nothing: no reload, no restart. A changed candidate is swapped
# in and checked by PostgreSQL itself (the server's own parser on the configuration files, and the
# pg_hba_file_rules view) BEFORE the server reloads; a rejected candidate is swapped back out, so the
# running configuration stays in place, and the step fails with PostgreSQL's message.
#
# On the live server, before anything changes, it refuses while login roles hold md5 password hashes
# (the new pg_hba admits SCRAM only): it names them and says how to re-set them. It also compares the
# live pg_hba.conf (one it did not write) with the new one, rule by rule as PostgreSQL reads them
# (pg_hba_file_rules), and refuses, naming them, while a live rule admits connections no new rule admits
# the same way: another network, hostssl from elsewhere, a user by another method. md5 and scram-sha-256
# count as one (a SCRAM verifier passes either); a rule that an earlier live rule already decides
# admits nobody and is not counted. The first pg_hba.conf it replaces is kept as pg_hba.conf.pre-katforge. Every run, changed or not, fails while a setting
# waits for a restart that was not allowed, and after the reload checks that each setting of
# katforge.conf really comes from it (pg_settings.sourcefile): a later file (ALTER SYSTEM's
# postgresql.auto.conf, another conf.d file) that overrides one is named.
set -euo pipefail

log() { printf 'pg-configure: %s\n' "$*" >&2; }

: "${PG_LISTEN_ADDRESSES:?PG_LISTEN_ADDRESSES is required, e.g. localhost,172.31.14.98}"
: "${PG_CLIENT_CIDRS:?PG_CLIENT_CIDRS is required: the client networks in CIDR form, space-separated}"
conf_dir=${PG_CONF_DIR:-/etc/postgresql/16/main}
bin_dir=${PG_BIN_DIR:-/usr/lib/postgresql/16/bin}
read -ra client_cidrs <<<"$PG_CLIENT_CIDRS"
read -ra restart <<<"${PG_RESTART_COMMAND:-systemctl restart postgresql@16-main}"
opted_in() { [[ ${1:-0} =~ ^(1|true|yes)$ ]]; }
allow_restart=false
opted_in "${PG_ALLOW_RESTART:-0}" && allow_restart=true
restart_lock=${KATFORGE_RESTART_LOCK:-/run/lock/katforge-restart.lock}
header="# Managed by katforge (infra/host/pg-configure.sh): changes made here are overwritten."

# The superuser connects as the postgres OS user, whom pg_hba admits over the socket (peer).
sql() { runuser -u postgres -- "$bin_dir/psql" -X -A -t -q -v ON_ERROR_STOP=1 -d postgres -c "$1"; }
check_only=${PG_CHECK_ONLY:-}
# What the server answers to the query $2; in a check, the fact $1 discovery read.
ask() { if [[ -n $check_only ]]; then cat "$check_only/$1"; else sql "$2"; fi; }

main_conf=$conf_dir/postgresql.conf
# The server's owner: it must be able to read every file written here.
[[ -n $check_only ]] || owner=$(stat -c %U "$main_conf")
# Assigned on its own: errexit sees a failed command substitution only in a plain assignment.
hba_file=$(ask hba_file 'SHOW hba_file')
managed_conf=$conf_dir/conf.d/katforge.conf
declare -A target=([katforge.conf]="$managed_conf" [pg_hba.conf]="$hba_file")

# Candidates and backups live beside the targets, so that swapping is an atomic rename; a check writes
# nothing on the host's configuration directory.
if [[ -n $check_only ]]; then work=$(mktemp -d); else work=$(mktemp -d "$conf_dir/.katforge.XXXXXX"); fi
trap 'rm -rf "$work"' EXIT

{
  echo "$header"
  echo "listen_addresses = '$PG_LISTEN_ADDRESSES'"
  cat
} >"$work/katforge.conf"

# Ubuntu's pg_hba.conf (pg_createcluster) as it stands, so that nobody who logs in today is locked out:
# local users by peer over the socket (postgres for administration), localhost with SCRAM (backups
# over 127.0.0.1). Then the client networks, with SCRAM: no md5.
{
  echo "$header"
  echo "# The first file this replaced is pg_hba.conf.pre-katforge, beside it."
  echo "# TYPE  DATABASE        USER            ADDRESS                 METHOD"
  echo "local   all             postgres                                peer"
  echo "local   all             all                                     peer"
  echo "host    all             all             127.0.0.1/32            scram-sha-256"
  echo "host    all             all             ::1/128                 scram-sha-256"
  echo "local   replication     all                                     peer"
  echo "host    replication     all             127.0.0.1/32            scram-sha-256"
  echo "host    replication     all             ::1/128                 scram-sha-256"
  echo "# Pods, container networks and the VPC: a password, checked with SCRAM."
  for cidr in "${client_cidrs[@]}"; do
    printf 'host    all             all             %-23s scram-sha-256\n' "$cidr"
  done
} >"$work/pg_hba.conf"

changed=()
for name in "${!target[@]}"; do
  cmp -s "$work/$name" "${target[$name]}" || changed+=("$name")
done

# Prints each rule of the live pg_hba.conf (JSON rows of pg_hba_file_rules in $1) that admits a
# connection no rule of the new file ($2) admits the same way, as "<file> line <n>: <the line>".
uncovered_rules() {
  python3 - "$@" <<'PY'
import ipaddress
import json
import sys

rules_path, new_path = sys.argv[1:]
PASSWORD = {"md5", "scram-sha-256", "password"}  # a SCRAM verifier passes each (pg_hba.conf docs)


def addresses(address, netmask):
    """What a rule's address admits: networks, or the word itself (samehost, samenet, a host name)."""
    if address == "all":
        return [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    try:
        bits = bin(int(ipaddress.ip_address(netmask))).count("1")
        return [ipaddress.ip_network(f"{address}/{bits}", strict=False)]
    except ValueError:
        return [address]


def within(inner, outer):
    if isinstance(inner, str) or isinstance(outer, str):
        return inner == outer
    return inner.version == outer.version and inner.subnet_of(outer)


def covers(a, b):
    """Whether every connection rule b matches, rule a matches too (whatever their methods)."""
    if a["type"] != b["type"] and not (a["type"] == "host" and b["type"].startswith("host")):
        return False
    # "all" matches every database but replication, which only "replication" matches.
    if not all(d in a["database"] or ("all" in a["database"] and d != "replication") for d in b["database"]):
        return False
    if not all(u in a["user_name"] or "all" in a["user_name"] for u in b["user_name"]):
        return False
    return b["type"] == "local" or all(any(within(x, y) for y in a["networks"]) for x in b["networks"])


def same_way(a, b):
    return a["auth_method"] == b["auth_method"] or {a["auth_method"], b["auth_method"]} <= PASSWORD


new = []
for line in open(new_path):
    fields = line.split("#", 1)[0].split()
    if fields:
        kind, database, user = fields[:3]
        network = [] if kind == "local" else [ipaddress.ip_network(fields[3])]
        new.append({"type": kind, "database": database.split(","), "user_name": user.split(","),
                    "networks": network, "auth_method": fields[-1]})
live = json.load(open(rules_path)) or []
for rule in live:
    rule["networks"] = [] if rule["type"] == "local" else addresses(rule["address"], rule["netmask"])
for i, rule in enumerate(live):
    if rule["auth_method"] == "reject" or any(covers(earlier, rule) for earlier in live[:i]):
        continue  # admits nobody
    if not any(covers(n, rule) and same_way(n, rule) for n in new):
        text = open(rule["file_name"]).read().splitlines()[rule["line_number"] - 1]
        print(f"{rule['file_name']} line {rule['line_number']}: {' '.join(text.split())}")
PY
}

if [[ " ${changed[*]} " == *" pg_hba.conf "* ]]; then
  refused=false
  # pg_hba's scram-sha-256 cannot check an md5 hash: these roles would be locked out.
  md5_roles=$(ask md5-roles "SELECT string_agg(quote_ident(rolname), ' ' ORDER BY rolname) FROM pg_authid
                             WHERE rolcanlogin AND rolpassword LIKE 'md5%'")
  if [[ -n $md5_roles ]]; then
    log "refusing to replace pg_hba.conf; nothing was changed. These login roles have md5 password hashes,"
    log "which the new pg_hba.conf (scram-sha-256 only) would lock out: $md5_roles"
    log "Set each password again as a SCRAM verifier (the same password will do), as root:"
    for role in $md5_roles; do
      log "  sudo -u postgres psql -c \"SET password_encryption = 'scram-sha-256'\" -c '\\password $role'"
    done
    log "(or ALTER ROLE <role> PASSWORD '...' in a session with password_encryption = 'scram-sha-256'), then run this again."
    refused=true
  fi
  # A file this script wrote holds the configuration's rules only: one it did not is compared.
  if [[ -e $hba_file && $(head -n 1 "$hba_file") != "$header" ]]; then
    ask live-rules.json "SELECT json_agg(json_build_object('file_name', file_name, 'line_number', line_number, 'type', type,
                  'database', database, 'user_name', user_name, 'address', address, 'netmask', netmask,
                  'auth_method', auth_method) ORDER BY rule_number)
           FROM pg_hba_file_rules WHERE error IS NULL" >"$work/live-rules.json"
    uncovered=$(uncovered_rules "$work/live-rules.json" "$work/pg_hba.conf")
    if [[ -n $uncovered ]] && opted_in "${PG_DROP_LIVE_HBA_RULES:-0}"; then
      log "dropping these live rules, which admit connections the new pg_hba.conf does not (PG_DROP_LIVE_HBA_RULES):"
      while IFS= read -r line; do log "  $line"; done <<<"$uncovered"
    elif [[ -n $uncovered ]]; then
      log "refusing to replace pg_hba.conf; nothing was changed. These live rules admit connections that no"
      log "rule of the new one admits the same way (scram-sha-256 for the client networks, peer on the socket):"
      while IFS= read -r line; do log "  $line"; done <<<"$uncovered"
      log "Keep a network: pulumi config set --path 'katforge:postgresExtraClientCidrs[0]' <network> (PG_CLIENT_CIDRS);"
      log "or let the run drop them: pulumi config set katforge:postgresDropLiveHbaRules true (PG_DROP_LIVE_HBA_RULES),"
      log "then back to false once it has run. The original file is kept as $hba_file.pre-katforge either way."
      refused=true
    fi
  fi
  if $refused; then exit 1; fi
fi
if [[ -n $check_only ]]; then
  log "check only: nothing refused before the change"
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

if [[ ${#changed[@]} -eq 0 ]]; then
  log "configuration unchanged"
else
  # The original pg_hba.conf, before the first replacement: kept, never overwritten.
  if [[ " ${changed[*]} " == *" pg_hba.conf "* && -e $hba_file && ! -e $hba_file.pre-katforge &&
    $(head -n 1 "$hba_file") != "$header" ]]; then
    cp -p "$hba_file" "$hba_file.pre-katforge"
    log "the original pg_hba.conf is kept as $hba_file.pre-katforge"
  fi
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
fi

# Checked on every run, so that a restart refused or failed last time is asked for again.
pending=$(sql "SELECT string_agg(format('%s (%s now, %s after a restart)', s.name, current_setting(s.name), f.setting),
                                 ', ' ORDER BY s.name)
                 FROM pg_settings s
                 JOIN (SELECT DISTINCT ON (name) name, setting FROM pg_file_settings
                        ORDER BY name, seqno DESC) f USING (name)
                WHERE s.pending_restart")
if [[ -n $pending ]]; then
  if ! $allow_restart; then
    log "these settings wait for a restart, which this run may not do: $pending"
    log "Apply them at a quiet time, as root: ${restart[*]}"
    log "or let the next run restart: pulumi config set katforge:postgresAllowRestart true (PG_ALLOW_RESTART),"
    log "then back to false once it has run. Everything else is applied."
    exit 1
  fi
  log "restarting for $pending"
  # k3s-install.sh takes the same lock around its restarts: the two never restart at once.
  (
    if ! flock -w "${KATFORGE_RESTART_LOCK_WAIT:-900}" 9; then
      log "another restart on this host holds $restart_lock; not restarting"
      exit 1
    fi
    "${restart[@]}"
    for _ in {1..100}; do
      sql "SELECT 1" >/dev/null 2>&1 && exit 0
      sleep 0.2
    done
    log "PostgreSQL does not answer after the restart"
    exit 1
  ) 9>>"$restart_lock"
  pending=$(sql "SELECT string_agg(name, ', ' ORDER BY name) FROM pg_settings WHERE pending_restart")
  if [[ -n $pending ]]; then
    log "still waiting for a restart after it: $pending"
    exit 1
  fi
fi

# Where each setting of katforge.conf really comes from: a file read later wins.
names=$(sed -n 's/^[[:space:]]*\([a-z_][a-z0-9_]*\)[[:space:]]*=.*/\1/p' "$managed_conf" | sort -u | paste -sd, -)
overridden=$(sql "SELECT string_agg(format('%s from %s line %s', name, coalesce(sourcefile, source), sourceline),
                                    ', ' ORDER BY name)
                    FROM pg_settings
                   WHERE name = ANY (string_to_array('$names', ','))
                     AND coalesce(sourcefile, '') <> '$(realpath "$managed_conf")'")
if [[ -n $overridden ]]; then
  log "settings of $managed_conf are overridden: $overridden."
  log "Remove them there (ALTER SYSTEM RESET <name>; for postgresql.auto.conf) and run this again."
  exit 1
fi

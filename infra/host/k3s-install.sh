#!/usr/bin/env bash
# Install k3s at K3S_VERSION as a server whose every setting is in config.yaml (read from stdin), or
# bring a running one to that version and configuration, restarting it only when that changes something.
#
#   K3S_VERSION=v1.34.6+k3s1 k3s-install.sh < config.yaml
#
# K3S_REPLACE_LIVE_FLAGS  1 lets config.yaml's value replace a different one the live unit's command line
#                   gives; otherwise such a difference is refused, and shown
# K3S_ENCRYPT_EXISTING_SECRETS  1 turns secrets encryption on for a running cluster that has none (a
#                   restart, then every Secret is encrypted again); otherwise that is refused
# K3S_BIN_DIR       default /usr/local/bin; K3S_SYSTEMD_DIR default /etc/systemd/system
# K3S_CONFIG_FILE   default /etc/rancher/k3s/config.yaml
# K3S_RELEASES_URL  default https://github.com/k3s-io/k3s/releases/download
# K3S_READY_TIMEOUT seconds to wait for /readyz after a restart, and for the re-encryption; default 600
# KATFORGE_STATE_DIR  where a restart or a re-encryption that has not completed yet is recorded, so that the
#                   next run finishes it; default /var/lib/katforge
# KATFORGE_RESTART_LOCK  held from the restart until k3s is ready, so that PostgreSQL (pg-configure.sh takes
#                   it too) never restarts at the same time; default /run/lock/katforge-restart.lock
# KATFORGE_RESTART_LOCK_WAIT  seconds to wait for it; default 900
# K3S_CHECK_ONLY    a directory of facts read on the host (`make preflight` writes it from `make discover`,
#                   tools/preflight.py): decide exactly as a run would, and change, download and restart
#                   nothing. `k3s --version` is its file `version` (the release; empty: not installed),
#                   `k3s secrets-encrypt status` its file `encryption-status` (absent: not known, not
#                   checked), `systemctl cat k3s` its file `unit.cat`; the env files and config.yaml are
#                   read where unit.cat and K3S_CONFIG_FILE say. Whether k3s runs is not checked. Exits as a
#                   refusing run would, else 0.
#
# Runs as root. Like k3s-ansible (roles/k3s_server: its own unit, the release's binary), not through
# k3s's install.sh, which rewrites the unit's command line (live flags lost), rewrites the env file
# from its own environment (K3S_TOKEN lost, K3S_VERSION added), restarts when nothing changed, and
# never when only config.yaml did (k3s-io/k3s#11180). Here:
# - the binary is the release's `k3s`, checked against the release's sha256sum-<arch>.txt; an older
#   version than the installed one, or a jump of more than one minor version, is refused;
# - the unit has the shape install.sh writes (create_systemd_service_file) with no flags:
#   `ExecStart=<bin>/k3s server`. Everything the live k3s runs with is compared with the new config.yaml
#   (a flag's key is its name without dashes): the effective unit as `systemctl cat k3s` shows it (unit
#   file and drop-ins: ExecStart's flags; Environment= and EnvironmentFile= for the K3S_* variables k3s
#   reads as flags), and a config.yaml written by hand. A setting config.yaml has alike is dropped; one it
#   lacks is carried into it (in a section of its own, kept on later runs) unless it stays where it is (a
#   drop-in, an env file our unit keeps); one it sets otherwise is refused. k3s lets a command-line flag
#   win over config.yaml and config.yaml over the environment (pkg/configfilearg: the file's values become
#   flags), so K3S_REPLACE_LIVE_FLAGS can replace the unit's flags and the environment's values, never a
#   drop-in's ExecStart. A secret's value (a token...) is never shown;
# - k3s.service.env is never written: the live one stays as it is;
# - k3s restarts when the binary, the unit or config.yaml changed, and only then; the run succeeds only
#   once /readyz answers, and, when config.yaml asks for secrets encryption, once
#   `k3s secrets-encrypt status` says Enabled with an AES-CBC key. A restart or a re-encryption that did
#   not complete (lock wait, /readyz or re-encryption timed out, run interrupted) is recorded in
#   KATFORGE_STATE_DIR before anything is installed, and done by the next run even though the files on
#   disk then match.
#
# Secrets encryption on a cluster that runs without it: k3s generates its AES-CBC key when it starts
# with secrets-encryption and has no encryption configuration yet (pkg/daemons/control/deps,
# genEncryptionConfigAndState), so new Secrets are encrypted from that restart on; `k3s secrets-encrypt
# rotate-keys` (k3s >= 1.28, pkg/server/handlers/secrets-encrypt.go) then adds a new key and rewrites
# every Secret with it. k3s's documentation calls turning encryption on later "not supported", hence the
# explicit K3S_ENCRYPT_EXISTING_SECRETS, after a backup of /var/lib/rancher/k3s/server.
set -euo pipefail

log() { printf 'k3s-install: %s\n' "$*" >&2; }
# shellcheck source=k3s-release.sh
source "$(dirname "$(readlink -f "$0")")/k3s-release.sh"

: "${K3S_VERSION:?K3S_VERSION is required, e.g. v1.34.6+k3s1}"
bin_dir=${K3S_BIN_DIR:-/usr/local/bin}
systemd_dir=${K3S_SYSTEMD_DIR:-/etc/systemd/system}
config_file=${K3S_CONFIG_FILE:-/etc/rancher/k3s/config.yaml}
releases=${K3S_RELEASES_URL:-https://github.com/k3s-io/k3s/releases/download}
ready_timeout=${K3S_READY_TIMEOUT:-600}
restart_lock=${KATFORGE_RESTART_LOCK:-/run/lock/katforge-restart.lock}
state_dir=${KATFORGE_STATE_DIR:-/var/lib/katforge}
# "what changed" of a restart that has not yet been followed by /readyz; "restart" or "rotated" while
# the existing Secrets are being encrypted (before or after `rotate-keys` was accepted).
restart_pending=$state_dir/k3s-restart-pending
encryption_pending=$state_dir/k3s-encryption-pending
k3s=$bin_dir/k3s
unit_file=$systemd_dir/k3s.service
opted_in() { [[ ${1:-0} =~ ^(1|true|yes)$ ]]; }
check_only=${K3S_CHECK_ONLY:-}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/config.yaml"

# --- versions --------------------------------------------------------------------------------------

# "v1.34.6+k3s2" as "1 34 6 2", so that versions compare as numbers (v1.34.10 is newer than v1.34.6).
version_numbers() {
  [[ $1 =~ ^v([0-9]+)\.([0-9]+)\.([0-9]+)\+k3s([0-9]+)$ ]] || return 1
  echo "${BASH_REMATCH[1]} ${BASH_REMATCH[2]} ${BASH_REMATCH[3]} ${BASH_REMATCH[4]}"
}
if ! wanted=$(version_numbers "$K3S_VERSION"); then
  log "K3S_VERSION=$K3S_VERSION is not a k3s release such as v1.34.6+k3s1"
  exit 2
fi
installed=""
if [[ -n $check_only ]]; then
  installed=$(<"$check_only/version")
elif [[ -x $k3s ]]; then
  installed=$("$k3s" --version | awk 'NR == 1 { print $3 }')
fi
if [[ -n $installed ]]; then
  if ! have=$(version_numbers "$installed"); then
    log "the installed k3s reports version '$installed', which this script cannot compare; nothing was changed"
    exit 1
  fi
  read -ra old <<<"$have"
  read -ra new <<<"$wanted"
  for i in 0 1 2 3; do
    ((new[i] == old[i])) && continue
    if ((new[i] < old[i])); then
      log "refusing to downgrade k3s from $installed to $K3S_VERSION (its datastore may not go back); nothing was changed."
      log "Set katforge:k3sVersion to $installed or newer."
      exit 1
    fi
    break
  done
  if ((new[0] != old[0] || new[1] > old[1] + 1)); then
    log "refusing to go from $installed to $K3S_VERSION: Kubernetes upgrades one minor version at a time; nothing was changed."
    exit 1
  fi
fi

# --- the live k3s's settings against config.yaml ---------------------------------------------------

k3s_unit k3s server k3s-install.sh >"$work/k3s.service"

# The effective unit, as systemd reads it wherever it lies: the unit file, then its drop-ins, each
# after a "# <path>" line.
if [[ -n $check_only ]]; then
  cp "$check_only/unit.cat" "$work/unit.cat"
elif ! systemctl cat --no-pager k3s >"$work/unit.cat" 2>"$work/unit.err"; then
  if [[ -e $unit_file ]]; then
    log "systemctl cat k3s failed, so the live unit cannot be compared; nothing was changed: $(<"$work/unit.err")"
    exit 1
  fi
  : >"$work/unit.cat"
fi

# Writes the config.yaml to install to $work/config.final; prints "carried <keys>" and "encryption
# true|false" for the log, or the differences it refuses (exit 3).
if ! outcome=$(python3 - "$work/unit.cat" "$work/k3s.service" "$work/config.yaml" "$config_file" \
  "$work/config.final" "$(opted_in "${K3S_REPLACE_LIVE_FLAGS:-0}" && echo 1 || echo 0)" 2>&1 <<'PY'
import os
import re
import shlex
import sys

import yaml  # PyYAML: on every Ubuntu cloud image, cloud-init needs it

cat_path, ours_path, candidate_path, current_path, final_path, replace = sys.argv[1:]
MARK = ("# Carried from the live k3s unit's command line or config.yaml by k3s-install.sh (kept on later\n"
        "# runs): set a key in the program's k3s configuration to manage it there.\n")
SHORT = {"c": "config", "d": "data-dir", "t": "token", "s": "server", "o": "write-kubeconfig", "i": "node-ip",
         "l": "log"}  # `k3s server --help`
# The variables k3s reads as flags: `k3s server --help`, [$VARIABLE] (pkg/cli/cmds/server.go, agent.go).
ENV = {"K3S_CONFIG_FILE": "config", "K3S_DEBUG": "debug", "K3S_DATA_DIR": "data-dir",
       "K3S_KUBECONFIG_OUTPUT": "write-kubeconfig", "K3S_KUBECONFIG_MODE": "write-kubeconfig-mode",
       "K3S_KUBECONFIG_GROUP": "write-kubeconfig-group", "K3S_TOKEN": "token", "K3S_TOKEN_FILE": "token-file",
       "K3S_AGENT_TOKEN": "agent-token", "K3S_AGENT_TOKEN_FILE": "agent-token-file", "K3S_URL": "server",
       "K3S_CLUSTER_INIT": "cluster-init", "K3S_CLUSTER_RESET": "cluster-reset",
       "K3S_DATASTORE_ENDPOINT": "datastore-endpoint", "K3S_DATASTORE_CAFILE": "datastore-cafile",
       "K3S_DATASTORE_CERTFILE": "datastore-certfile", "K3S_DATASTORE_KEYFILE": "datastore-keyfile",
       "K3S_NODE_NAME": "node-name", "K3S_SYSTEM_DEFAULT_REGISTRY": "system-default-registry",
       "K3S_RESOLV_CONF": "resolv-conf", "K3S_VPN_AUTH": "vpn-auth", "K3S_VPN_AUTH_FILE": "vpn-auth-file",
       "K3S_SELINUX": "selinux", "K3S_LB_SERVER_PORT": "lb-server-port", "K3S_CLUSTER_SECRET": "cluster-secret",
       "AWS_ACCESS_KEY_ID": "etcd-s3-access-key", "AWS_SECRET_ACCESS_KEY": "etcd-s3-secret-key"}
SECRET = {"token", "agent-token", "cluster-secret", "datastore-endpoint", "vpn-auth", "etcd-s3-access-key",
          "etcd-s3-secret-key"}


def read(path):
    return open(path).read() if os.path.exists(path) else ""


def unit_files(text):
    """[(path, text)] of `systemctl cat`: the unit file first, then its drop-ins."""
    files = []
    for line in text.splitlines(keepends=True):
        header = re.fullmatch(r"# (/\S+\.(?:service|conf))\n?", line)
        if header:
            files.append((header.group(1), []))
        elif files:
            files[-1][1].append(line)
    return [(path, "".join(lines)) for path, lines in files]


def settings(text):
    """(key, value) of each line of a unit's [Service] section; a line ending in a backslash goes on."""
    section = None
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and line[0] not in "#;":
            key, value = line.split("=", 1)
            yield key.strip(), value.strip()


def env_file(path):
    """{name: value} of a systemd EnvironmentFile: KEY=VALUE lines, shell-like quotes."""
    out = {}
    for line in re.sub(r"\\\n", "", read(path)).splitlines():
        name, equals, value = line.strip().partition("=")
        if equals and name and name[0] not in "#;":
            try:
                out[name.strip()] = " ".join(shlex.split(value))
            except ValueError:
                out[name.strip()] = value.strip()
    return out


def service(files):
    """The ExecStart systemd runs, as (value, the file it is in), and the environment it gets, as
    {name: (value, where it is set)}: EnvironmentFile= wins over Environment=, a later one over an earlier."""
    exec_start, environment, env_files = None, {}, []
    for path, text in files:
        for key, value in settings(text):
            if key == "ExecStart":
                exec_start = (value, path) if value else None  # "ExecStart=" empties the list
            elif key == "Environment":
                if not value:
                    environment.clear()
                for word in shlex.split(value):
                    name, _, setting = word.partition("=")
                    environment[name] = (setting, f"Environment= in {path}")
            elif key == "EnvironmentFile":
                if not value:
                    env_files.clear()
                else:
                    env_files.append(value.lstrip("-").replace("%N", "k3s").replace("%n", "k3s.service"))
    for path in env_files:
        environment.update({name: (value, path) for name, value in env_file(path).items()})
    return exec_start, environment


def command_flags(exec_start):
    """{key: [values]} of `ExecStart=<k3s> server <flags>`; a flag without a value is true."""
    args = shlex.split(exec_start.lstrip("-@:+!"))[1:]
    if args and args[0] == "server":
        args = args[1:]
    flags, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            sys.exit(f"the live unit's ExecStart has an argument that is no flag: {arg!r}; nothing was changed")
        key, value = arg.lstrip("-"), True
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("-"):
            value, i = args[i + 1], i + 1
        if not arg.startswith("--"):
            key = SHORT.get(key, key)
        flags.setdefault(key, []).append(value)
        i += 1
    return flags


def words(value):
    """A flag's or a config value as a set of strings: lists and comma lists item by item."""
    items = value if isinstance(value, list) else [value]
    out = set()
    for item in items:
        if isinstance(item, bool):
            out.add("true" if item else "false")
        else:
            out.update(part.strip() for part in str(item).split(","))
    return out


def show(key, value):
    return "(a secret, not shown)" if key in SECRET else ",".join(sorted(words(value)))


def as_value(text):
    """An environment variable's value as config.yaml holds it: k3s reads "true"/"false" as a switch."""
    return {"true": True, "false": False}.get(text.lower(), text)


candidate = yaml.safe_load(read(candidate_path)) or {}
files = unit_files(read(cat_path))
live_exec, live_env = service(files)
# After this run the unit file is ours and the drop-ins stay: what they set stays too.
_, kept_env = service([(ours_path, read(ours_path)), *files[1:]])

# What k3s runs with now, key by key, from the weakest source to the strongest (a later one wins):
# (value, where, stays after this run). "ours" is what an earlier run wrote into config.yaml.
live = {}
for name, (value, where) in live_env.items():
    if name in ENV:
        live[ENV[name]] = (as_value(value), f"{name} in {where}", kept_env.get(name, (None,))[0] == value)
current = read(current_path)
if current.startswith("# Managed by katforge"):
    ours, _, hand = current.partition(MARK)
    live.update({key: (value, "ours", True) for key, value in (yaml.safe_load(ours) or {}).items()})
else:
    hand = current
live.update({key: (value, current_path, False) for key, value in (yaml.safe_load(hand) or {}).items()})
if live_exec:
    exec_start, where = live_exec
    in_drop_in = files and where != files[0][0]
    source = f"the ExecStart of {where}" if in_drop_in else "the live unit's command line"
    for key, values in command_flags(exec_start).items():
        live[key] = (values if len(values) > 1 else values[0], source, bool(in_drop_in))

carried, conflicts, fixed = {}, [], []
for key, (value, where, stays) in live.items():
    wanted = candidate.get(key)
    if where == "ours":
        continue  # the program's own earlier value: config.yaml replaces it
    if key == "config":
        if value != current_path:
            fixed.append(f"config: {show(key, value)} from {where}: k3s reads another configuration file there")
    elif key not in candidate:
        if not stays:
            carried[key] = value
    else:
        if isinstance(wanted, bool) and isinstance(value, str):
            value = value.lower() in ("1", "t", "true")
        if not words(value) <= words(wanted):  # config.yaml may add list items, not drop them
            line = f"{key}: {show(key, value)} on the live host, {show(key, wanted)} in config.yaml (from {where})"
            # config.yaml's value wins over an environment variable, not over a flag that stays.
            (fixed if stays and where.startswith("the ExecStart of ") else conflicts).append(line)
if fixed or (conflicts and replace != "1"):
    print("the live k3s settings differ from config.yaml; nothing was changed:")
    for line in fixed + conflicts:
        print(f"  {line}")
    if conflicts:
        print("Put the live value into the program's k3s configuration, or let config.yaml's replace it:")
        print("pulumi config set katforge:k3sReplaceLiveFlags true (K3S_REPLACE_LIVE_FLAGS), back to false after.")
    if fixed:
        print("Another configuration file, and a flag of a drop-in's ExecStart (which stays, and wins over")
        print("config.yaml), cannot be replaced: change the drop-in or the unit's environment, then run this again.")
    sys.exit(3)

text = read(candidate_path)
if carried:
    text = text.rstrip("\n") + "\n" + MARK + yaml.safe_dump(carried, sort_keys=False)
open(final_path, "w").write(text)
print("carried", " ".join(carried) or "-")
print("encryption", "true" if candidate.get("secrets-encryption") is True else "false")
PY
); then
  log "$outcome"
  exit 1
fi
carried=$(awk '$1 == "carried" { $1 = ""; print substr($0, 2) }' <<<"$outcome")
wants_encryption=$(awk '$1 == "encryption" { print $2 }' <<<"$outcome")

# --- secrets encryption ----------------------------------------------------------------------------

# True when `k3s secrets-encrypt status` says Enabled and an AES-CBC key is the active one ("*").
# An encryption configuration that exists but lists identity first (encryption disabled) is not enough.
encrypted() {
  local status
  if [[ -n $check_only ]]; then
    status=$(<"$check_only/encryption-status")
  else
    status=$("$k3s" secrets-encrypt status 2>&1) || return 1
  fi
  grep -q '^Encryption Status: Enabled$' <<<"$status" && grep -Eq '^ *\* +AES-CBC' <<<"$status"
}
# Empty while k3s does not answer.
rotation_stage() { { "$k3s" secrets-encrypt status 2>&1 || true; } | sed -n 's/^Current Rotation Stage: //p'; }
encrypt_existing=false
if [[ -n $check_only && -n $installed && ! -e $check_only/encryption-status ]]; then
  log "check only: secrets encryption not checked, its status is not known"
elif [[ -n $installed ]]; then
  if [[ -z $check_only ]] && ! systemctl is-active --quiet k3s; then
    log "k3s $installed is installed but not running: start it (systemctl start k3s) and run this again; nothing was changed"
    exit 1
  fi
  if [[ $wants_encryption == true && -e $encryption_pending ]]; then
    log "resuming the encryption of the existing Secrets that an earlier run began"
    encrypt_existing=true
  elif [[ $wants_encryption == true ]] && ! encrypted; then
    if ! opted_in "${K3S_ENCRYPT_EXISTING_SECRETS:-0}"; then
      log "k3s $installed runs without secrets encryption (k3s secrets-encrypt status: not Enabled with an"
      log "AES-CBC key), and config.yaml asks for it; nothing was changed. To turn it on: back up"
      log "/var/lib/rancher/k3s/server, then let this run do it: pulumi config set katforge:k3sEncryptExistingSecrets"
      log "true (K3S_ENCRYPT_EXISTING_SECRETS: one restart with secrets-encryption, then k3s secrets-encrypt"
      log "rotate-keys, which encrypts every existing Secret); or keep it off for now: pulumi config set"
      log "katforge:k3sSecretsEncryption false."
      exit 1
    fi
    encrypt_existing=true
  elif [[ $wants_encryption != true ]] && encrypted; then
    log "k3s encrypts Secrets, but config.yaml has no secrets-encryption: k3s would start unable to read"
    log "them. Nothing was changed. Keep secrets-encryption: true in config.yaml."
    exit 1
  fi
fi

if [[ -n $check_only ]]; then
  log "check only: nothing refused"
  exit 0
fi

# --- what changes ----------------------------------------------------------------------------------

changed=()
[[ $installed == "$K3S_VERSION" ]] || changed+=(binary)
cmp -s "$work/k3s.service" "$unit_file" || changed+=(unit)
cmp -s "$work/config.final" "$config_file" || changed+=(config)
# What k3s restarts for: this run's changes, and those of an earlier restart that did not complete.
declare -A restart_for=()
for what in "${changed[@]}"; do restart_for[$what]=1; done
if [[ -e $restart_pending ]]; then
  log "an earlier run installed a new $(<"$restart_pending"), and k3s was not ready after it: restarting again"
  for what in $(<"$restart_pending"); do restart_for[$what]=1; done
fi
if [[ ${#restart_for[@]} -eq 0 ]] && ! $encrypt_existing; then
  log "k3s $K3S_VERSION already runs with this unit and configuration"
  exit 0
fi

# --- apply -----------------------------------------------------------------------------------------

if [[ " ${changed[*]} " == *" binary "* ]]; then
  download_k3s
fi

# Recorded before anything is installed: until k3s is ready after its restart (or the Secrets are all
# encrypted again), a later run finds these and finishes the job, though the files then match.
mkdir -p "$state_dir"
if $encrypt_existing && [[ ! -e $encryption_pending ]]; then echo restart >"$encryption_pending"; fi
[[ ${#restart_for[@]} -eq 0 ]] || echo "${!restart_for[*]}" >"$restart_pending"

if [[ " ${changed[*]} " == *" binary "* ]]; then
  mkdir -p "$bin_dir"
  # A rename: the running server keeps its binary until it restarts.
  install -m 0755 "$work/k3s" "$bin_dir/.k3s.new"
  mv -f "$bin_dir/.k3s.new" "$k3s"
  for tool in kubectl crictl ctr; do
    [[ -e $bin_dir/$tool ]] || ln -s k3s "$bin_dir/$tool"
  done
fi
if [[ " ${changed[*]} " == *" config "* ]]; then
  # The configuration holds no secret of the program's, but may hold a carried --token: root only.
  install -D -m 0600 "$work/config.final" "$config_file"
  [[ $carried == "-" ]] || log "carried the live $carried into $config_file"
fi
if [[ " ${changed[*]} " == *" unit "* ]]; then
  install -D -m 0644 "$work/k3s.service" "$unit_file"
fi
# Also when an earlier run installed the unit and stopped before systemd read it.
[[ -z ${restart_for[unit]:-} ]] || systemctl daemon-reload
systemctl is-enabled --quiet k3s || systemctl enable --quiet k3s

ready() { "$k3s" kubectl get --raw=/readyz >/dev/null 2>&1; }
if [[ ${#restart_for[@]} -gt 0 ]]; then
  log "restarting k3s for a new ${!restart_for[*]}"
  # pg-configure.sh takes the same lock around PostgreSQL's restarts: the two never restart at once.
  (
    if ! flock -w "${KATFORGE_RESTART_LOCK_WAIT:-900}" 9; then
      log "another restart on this host holds $restart_lock; k3s was not restarted (run this again)"
      exit 1
    fi
    systemctl restart k3s
    deadline=$((SECONDS + ready_timeout))
    until ready; do
      if ((SECONDS >= deadline)); then
        log "k3s is not ready (/readyz) ${ready_timeout}s after its restart: see journalctl -u k3s (the next run restarts it again)"
        exit 1
      fi
      sleep 1
    done
  ) 9>>"$restart_lock"
  rm -f "$restart_pending"
fi

if $encrypt_existing; then
  # rotate-keys is accepted only at stage start or reencrypt_finished (pkg/server/handlers/secrets-encrypt.go,
  # encryptionRotateKeys). It is not asked again while k3s still re-encrypts, nor once the rotation this
  # script asked for has finished.
  stage=$(rotation_stage)
  if [[ $stage != reencrypt_active && ! ($stage == reencrypt_finished && $(<"$encryption_pending") == rotated) ]]; then
    log "encrypting the existing Secrets: k3s secrets-encrypt rotate-keys"
    if ! "$k3s" secrets-encrypt rotate-keys >&2; then
      log "k3s secrets-encrypt rotate-keys failed: see journalctl -u k3s (the next run asks again)"
      exit 1
    fi
    echo rotated >"$encryption_pending"
  fi
  deadline=$((SECONDS + ready_timeout))
  until [[ $(rotation_stage) == reencrypt_finished ]]; do
    if ((SECONDS >= deadline)); then
      log "the Secrets are not all encrypted again ${ready_timeout}s later: see journalctl -u k3s (the next run waits again)"
      exit 1
    fi
    sleep 1
  done
  rm -f "$encryption_pending"
fi
if [[ $wants_encryption == true ]] && ! encrypted; then
  log "k3s runs, but k3s secrets-encrypt status does not say Enabled with an AES-CBC key:"
  "$k3s" secrets-encrypt status >&2 || true
  exit 1
fi
log "k3s $("$k3s" --version | awk 'NR == 1 { print $3 }') ready"

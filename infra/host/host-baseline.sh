#!/usr/bin/env bash
# The baseline every host gets: SSH by key only and never as root, security updates installed
# unattended, and the clock in UTC.
#
#   host-baseline.sh
#
# SSHD_DROP_IN  sshd configuration written here; default /etc/ssh/sshd_config.d/00-katforge.conf
#               (sshd keeps the first value it reads, so the lowest name wins over cloud-init's files)
# SSHD_CONFIG   sshd's main configuration, which includes the drop-in; default /etc/ssh/sshd_config
# APT_CONF_DIR  default /etc/apt/apt.conf.d
# KATFORGE_STATE_DIR  where a reload still owed is recorded; default /var/lib/katforge
#
# Runs as root. Does nothing that is already in place. sshd reloads only after `sshd -t` accepts its
# whole configuration with the new drop-in and `sshd -T` shows that it would take the drop-in's
# settings; otherwise the previous drop-in is put back, sshd is not reloaded and the run fails, so that
# the next run tries again. A configuration sshd rejects before any change is left alone.
# `sshd -T` reads the configuration files, not the running daemon: every run checks with it that the
# files, all of them, give the drop-in's settings (another file may have come to override them). That
# the daemon runs with them rests on the reload: a marker written before the drop-in is installed and
# removed once `systemctl reload ssh` succeeded makes every later run reload until one does, so a
# failed reload is not mistaken for "in place" because the file is.
set -euo pipefail

log() { printf 'host-baseline: %s\n' "$*" >&2; }

drop_in=${SSHD_DROP_IN:-/etc/ssh/sshd_config.d/00-katforge.conf}
sshd_config=${SSHD_CONFIG:-/etc/ssh/sshd_config}
apt_conf_dir=${APT_CONF_DIR:-/etc/apt/apt.conf.d}
reload_pending=${KATFORGE_STATE_DIR:-/var/lib/katforge}/sshd-reload-pending
apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q "$@"; }

# Writes stdin to $1 unless it already holds exactly that; succeeds only if the file changed.
replace_if_different() {
  local file=$1 candidate
  candidate=$(mktemp)
  cat >"$candidate"
  if cmp -s "$candidate" "$file"; then
    rm -f "$candidate"
    return 1
  fi
  install -D -m 0644 "$candidate" "$file"
  rm -f "$candidate"
}

# The drop-in's settings as `sshd -T` prints them (lower-case keys).
declare -A ssh_settings=([passwordauthentication]=no [kbdinteractiveauthentication]=no [permitrootlogin]=no)
# Prints what keeps them from taking effect: sshd's complaint, or each one sshd, reading its whole
# configuration, has otherwise. Prints nothing when all are in effect.
not_in_effect() {
  local effective key
  if ! effective=$(sshd -T -f "$sshd_config" 2>&1); then
    printf '%s\n' "$effective"
    return
  fi
  for key in "${!ssh_settings[@]}"; do
    grep -qx "$key ${ssh_settings[$key]}" <<<"$effective" ||
      echo "$key is $(awk -v k="$key" '$1 == k { print $2 }' <<<"$effective")"
  done
}

ssh_candidate=$(mktemp)
trap 'rm -f "$ssh_candidate" "$ssh_candidate.old"' EXIT
cat >"$ssh_candidate" <<'EOF'
# Managed by katforge (infra/host/host-baseline.sh): changes made here are overwritten.
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
EOF
if ! cmp -s "$ssh_candidate" "$drop_in"; then
  if ! problems=$(sshd -t -f "$sshd_config" 2>&1); then
    log "sshd rejects its configuration before any change; nothing was changed. sshd says: $problems"
    exit 1
  fi
  had_drop_in=false
  if [[ -e $drop_in ]]; then
    cp -p "$drop_in" "$ssh_candidate.old"
    had_drop_in=true
  fi
  # Before the file: a run cut short anywhere after it leaves the reload owed, not forgotten.
  owed_before=false
  [[ ! -e $reload_pending ]] || owed_before=true
  install -D -m 0600 /dev/null "$reload_pending"
  install -D -m 0644 "$ssh_candidate" "$drop_in"
  if ! problems=$(sshd -t -f "$sshd_config" 2>&1); then
    problems=${problems:-"sshd -t failed"}
  else
    problems=$(not_in_effect)
  fi
  if [[ -n $problems ]]; then
    if $had_drop_in; then mv "$ssh_candidate.old" "$drop_in"; else rm -f "$drop_in"; fi
    $owed_before || rm -f "$reload_pending"
    log "sshd does not take the new $drop_in, so the previous one is back and sshd was not reloaded: $problems"
    exit 1
  fi
fi
problems=$(not_in_effect)
if [[ -n $problems ]]; then
  log "sshd's configuration files do not give the settings of $drop_in: $problems (a file it reads first sets them)"
  exit 1
fi
if [[ -e $reload_pending ]]; then
  # A reload that fails stops the run here, the marker kept: the next run reloads again.
  systemctl reload ssh
  rm -f "$reload_pending"
  log "sshd reloaded: password and root logins off"
fi

if ! dpkg-query -W -f='${Status}' unattended-upgrades 2>/dev/null | grep -q 'install ok installed'; then
  apt_get update
  apt_get install -y unattended-upgrades
fi
# Ubuntu's 50unattended-upgrades allows only the -security pockets: security updates, nothing else.
if replace_if_different "$apt_conf_dir/20auto-upgrades" <<'EOF'
// Managed by katforge (infra/host/host-baseline.sh): changes made here are overwritten.
APT::Periodic::Update-Package-Lists "1";
APT::Periodic::Unattended-Upgrade "1";
EOF
then
  log "unattended-upgrades: security updates daily"
fi

if [[ $(timedatectl show --property=Timezone --value) != UTC ]]; then
  timedatectl set-timezone UTC
  log "timezone: UTC"
fi
log "baseline in place"

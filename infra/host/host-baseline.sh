#!/usr/bin/env bash
# The baseline every host gets: SSH by key only and never as root, security updates installed
# unattended, and the clock in UTC.
#
#   host-baseline.sh
#
# SSHD_DROP_IN  sshd configuration written here; default /etc/ssh/sshd_config.d/00-katforge.conf
#               (sshd keeps the first value it reads, so the lowest name wins over cloud-init's files)
#
# Runs as root. Does nothing that is already in place. sshd reloads only after `sshd -t` accepts its
# whole configuration, so a broken one cannot lock operators out of the running daemon.
set -euo pipefail

log() { printf 'host-baseline: %s\n' "$*" >&2; }

drop_in=${SSHD_DROP_IN:-/etc/ssh/sshd_config.d/00-katforge.conf}
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

if replace_if_different "$drop_in" <<'EOF'
# Managed by katforge (infra/host/host-baseline.sh): changes made here are overwritten.
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
EOF
then
  if ! problems=$(sshd -t 2>&1); then
    log "sshd rejects its configuration, not reloading: $problems"
    exit 1
  fi
  systemctl reload ssh
  log "sshd: password and root logins off"
fi

if ! dpkg-query -W -f='${Status}' unattended-upgrades 2>/dev/null | grep -q 'install ok installed'; then
  apt_get update
  apt_get install -y unattended-upgrades
fi
# Ubuntu's 50unattended-upgrades allows only the -security pockets: security updates, nothing else.
if replace_if_different /etc/apt/apt.conf.d/20auto-upgrades <<'EOF'
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

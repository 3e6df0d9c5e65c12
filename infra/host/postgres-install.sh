#!/usr/bin/env bash
# Install PostgreSQL 16 from Ubuntu's archive and make sure its cluster runs and starts at boot, once
# the network is up.
#
#   postgres-install.sh
#
# PG_CLUSTER      the cluster's systemd unit; default postgresql@16-main (the package creates 16/main)
# PG_SYSTEMD_DIR  where unit drop-ins go; default /etc/systemd/system
#
# Runs as root. Does nothing when the package is installed, the drop-in in place and the cluster running.
set -euo pipefail

log() { printf 'postgres-install: %s\n' "$*" >&2; }

unit=${PG_CLUSTER:-postgresql@16-main}
drop_in=${PG_SYSTEMD_DIR:-/etc/systemd/system}/$unit.service.d/katforge-network-online.conf

if ! dpkg-query -W -f='${Status}' postgresql-16 2>/dev/null | grep -q 'install ok installed'; then
  log "installing postgresql-16"
  # cloud-init may still hold the dpkg lock on a fresh host: wait for it rather than fail.
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -q
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q postgresql-16
fi

# Ubuntu's unit waits only for network.target: at boot the server could start before the host's
# private address exists, fail to listen on it and serve localhost alone.
network_online='# Managed by katforge (infra/host/postgres-install.sh): changes made here are overwritten.
[Unit]
Wants=network-online.target
After=network-online.target'
if [[ ! -e $drop_in || $(<"$drop_in") != "$network_online" ]]; then
  install -D -m 0644 /dev/stdin "$drop_in" <<<"$network_online"
  systemctl daemon-reload
  log "$unit now starts once the network is online"
fi

if ! systemctl is-enabled --quiet "$unit" || ! systemctl is-active --quiet "$unit"; then
  systemctl enable --now "$unit"
  log "started $unit"
fi
log "postgresql-16 installed, $unit running"

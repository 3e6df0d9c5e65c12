#!/usr/bin/env bash
# Install PostgreSQL 16 from Ubuntu's archive and make sure its cluster runs and starts at boot.
#
#   postgres-install.sh
#
# PG_CLUSTER  the cluster's systemd unit; default postgresql@16-main (the package creates 16/main)
#
# Runs as root. Does nothing when the package is installed and the cluster is running.
set -euo pipefail

log() { printf 'postgres-install: %s\n' "$*" >&2; }

unit=${PG_CLUSTER:-postgresql@16-main}

if ! dpkg-query -W -f='${Status}' postgresql-16 2>/dev/null | grep -q 'install ok installed'; then
  log "installing postgresql-16"
  # cloud-init may still hold the dpkg lock on a fresh host: wait for it rather than fail.
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -q
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q postgresql-16
fi
if ! systemctl is-enabled --quiet "$unit" || ! systemctl is-active --quiet "$unit"; then
  systemctl enable --now "$unit"
  log "started $unit"
fi
log "postgresql-16 installed, $unit running"

#!/usr/bin/env bash
# Install k3s at K3S_VERSION as a server with the configuration read from stdin, or upgrade it in
# place when either differs from what the host runs.
#
#   K3S_VERSION=v1.34.6+k3s1 k3s-install.sh < config.yaml
#
# K3S_CONFIG_FILE    where k3s reads its configuration; default /etc/rancher/k3s/config.yaml
# K3S_INSTALLER_URL  the installer; default the install.sh of the K3S_VERSION tag itself, so the
#                    installer is pinned along with the release it installs
# K3S_ENCRYPTION_CONFIG  k3s's secrets encryption state; default
#                    /var/lib/rancher/k3s/server/cred/encryption-config.json
#
# Runs as root. Does nothing when the running version and the configuration file already match.
# Secrets encryption is turned on at the first install only: a server that already runs without it
# is left alone, and the step fails with the manual procedure k3s documents.
set -euo pipefail

log() { printf 'k3s-install: %s\n' "$*" >&2; }

: "${K3S_VERSION:?K3S_VERSION is required, e.g. v1.34.6+k3s1}"
config_file=${K3S_CONFIG_FILE:-/etc/rancher/k3s/config.yaml}
installer_url=${K3S_INSTALLER_URL:-https://raw.githubusercontent.com/k3s-io/k3s/${K3S_VERSION//+/%2B}/install.sh}
encryption_config=${K3S_ENCRYPTION_CONFIG:-/var/lib/rancher/k3s/server/cred/encryption-config.json}

candidate=$(mktemp)
trap 'rm -f "$candidate"' EXIT
cat >"$candidate"

# `k3s --version` prints "k3s version v1.34.6+k3s1 (hash)" first.
installed=$( (k3s --version 2>/dev/null || true) | awk 'NR == 1 { print $3 }')
if [[ $installed == "$K3S_VERSION" ]] && cmp -s "$candidate" "$config_file"; then
  log "k3s $K3S_VERSION already runs with this configuration"
  exit 0
fi

if [[ -n $installed && ! -e $encryption_config ]]; then
  log "k3s $installed on this host runs without secrets encryption, which k3s does not turn on by"
  log "configuration alone on an existing server. Nothing was changed. Back up /var/lib/rancher/k3s/server,"
  log "then, as root (https://docs.k3s.io/cli/secrets-encrypt, \"Disabling/Enabling Secrets Encryption\"):"
  log "  k3s secrets-encrypt enable"
  log "  systemctl restart k3s"
  log "  k3s secrets-encrypt reencrypt --force --skip"
  log "  k3s secrets-encrypt status    # Encryption Status: Enabled"
  log "and run this step again."
  exit 1
fi

# The configuration holds no secret, but k3s's own files stay private to root.
install -D -m 0600 "$candidate" "$config_file"
log "installing k3s $K3S_VERSION (was: ${installed:-not installed})"
# The installer (re)starts the k3s service, so a changed configuration takes effect here too.
curl -sfL "$installer_url" | INSTALL_K3S_VERSION=$K3S_VERSION sh -s - server

for _ in {1..60}; do
  k3s kubectl get --raw=/readyz >/dev/null 2>&1 && break
  sleep 5
done
k3s kubectl get --raw=/readyz >/dev/null
log "k3s $(k3s --version | awk 'NR == 1 { print $3 }') ready"

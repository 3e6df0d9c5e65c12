#!/usr/bin/env bash
# Install k3s at K3S_VERSION as an agent of the k3s host, or bring one to that version, configuration
# and join token, restarting it only when one of them changes.
#
#   K3S_VERSION=v1.34.6+k3s1 k3s-agent-install.sh < token-and-config
#
# stdin: the join token on the first line, then config.yaml, whose `token-file` says where the token goes
# (root's, 0600): the token is in no argument, environment variable, unit or configuration file.
#
# K3S_BIN_DIR       default /usr/local/bin; K3S_SYSTEMD_DIR default /etc/systemd/system
# K3S_CONFIG_FILE   default /etc/rancher/k3s/config.yaml
# K3S_RELEASES_URL  default https://github.com/k3s-io/k3s/releases/download
# K3S_READY_TIMEOUT seconds to wait for the kubelet after a restart; default 600
# KATFORGE_STATE_DIR  where a restart that has not completed is recorded, for the next run; default /var/lib/katforge
#
# Runs as root on an agent the program made (infra/hosts.py), so unlike the server's k3s-install.sh
# there are no live flags to compare and no secrets encryption, and no PostgreSQL to share a restart
# lock with. What the two share is k3s's own: the release's binary checked against the release's
# sha256sum-<arch>.txt and its --version (k3s-release.sh, sourced by both), and the unit k3s's install.sh
# writes (create_systemd_service_file), here for `k3s agent`. k3s restarts when the binary, the unit, config.yaml or the token changed; the run succeeds
# once the kubelet answers /healthz (it starts once the agent has joined the server); a restart that did
# not get there is recorded and done again by the next run.
set -euo pipefail

log() { printf 'k3s-agent-install: %s\n' "$*" >&2; }
# shellcheck source=k3s-release.sh
source "$(dirname "$(readlink -f "$0")")/k3s-release.sh"

: "${K3S_VERSION:?K3S_VERSION is required, e.g. v1.34.6+k3s1}"
bin_dir=${K3S_BIN_DIR:-/usr/local/bin}
systemd_dir=${K3S_SYSTEMD_DIR:-/etc/systemd/system}
config_file=${K3S_CONFIG_FILE:-/etc/rancher/k3s/config.yaml}
releases=${K3S_RELEASES_URL:-https://github.com/k3s-io/k3s/releases/download}
ready_timeout=${K3S_READY_TIMEOUT:-600}
state_dir=${KATFORGE_STATE_DIR:-/var/lib/katforge}
restart_pending=$state_dir/k3s-agent-restart-pending
k3s=$bin_dir/k3s
unit_file=$systemd_dir/k3s-agent.service

work=$(mktemp -d)  # 0700: the token lands here first
trap 'rm -rf "$work"' EXIT
IFS= read -r token || true
if [[ -z $token ]]; then
  log "the join token is expected on the first line of stdin; nothing was changed"
  exit 2
fi
(umask 077 && printf '%s\n' "$token" >"$work/token")
unset token
cat >"$work/config.yaml"
token_file=$(sed -n 's/^token-file: *//p' "$work/config.yaml")
if [[ $token_file != /* ]]; then
  log "config.yaml names no token-file (e.g. token-file: /etc/rancher/k3s/agent-token); nothing was changed"
  exit 2
fi

k3s_unit k3s-agent agent k3s-agent-install.sh >"$work/k3s-agent.service"

installed=""
[[ -x $k3s ]] && installed=$("$k3s" --version | awk 'NR == 1 { print $3 }')
changed=()
[[ $installed == "$K3S_VERSION" ]] || changed+=(binary)
cmp -s "$work/k3s-agent.service" "$unit_file" || changed+=(unit)
cmp -s "$work/config.yaml" "$config_file" || changed+=(config)
cmp -s "$work/token" "$token_file" || changed+=(token)
restart_for=("${changed[@]}")
if [[ -e $restart_pending ]]; then
  log "an earlier run installed a new $(<"$restart_pending"), and the agent was not ready after it: restarting again"
  read -ra earlier <"$restart_pending"
  restart_for+=("${earlier[@]}")
fi
if [[ ${#restart_for[@]} -eq 0 ]]; then
  log "k3s agent $K3S_VERSION already runs with this unit, configuration and token"
  exit 0
fi

if [[ " ${changed[*]} " == *" binary "* ]]; then
  download_k3s
fi

# Recorded before anything is installed: until the agent is ready after its restart, a later run
# restarts it again, though the files then match.
mkdir -p "$state_dir"
echo "${restart_for[*]}" >"$restart_pending"
if [[ " ${changed[*]} " == *" binary "* ]]; then
  mkdir -p "$bin_dir"
  install -m 0755 "$work/k3s" "$bin_dir/.k3s.new"
  mv -f "$bin_dir/.k3s.new" "$k3s"
  for tool in kubectl crictl ctr; do
    [[ -e $bin_dir/$tool ]] || ln -s k3s "$bin_dir/$tool"
  done
fi
[[ " ${changed[*]} " != *" token "* ]] || install -D -m 0600 "$work/token" "$token_file"
[[ " ${changed[*]} " != *" config "* ]] || install -D -m 0600 "$work/config.yaml" "$config_file"
[[ " ${changed[*]} " != *" unit "* ]] || install -D -m 0644 "$work/k3s-agent.service" "$unit_file"
[[ " ${restart_for[*]} " != *" unit "* ]] || systemctl daemon-reload
systemctl is-enabled --quiet k3s-agent || systemctl enable --quiet k3s-agent

log "restarting k3s-agent for a new ${restart_for[*]}"
systemctl restart k3s-agent
# The kubelet's own health endpoint (127.0.0.1:10248, its --healthz-port default).
deadline=$((SECONDS + ready_timeout))
until curl -sf --max-time 2 http://127.0.0.1:10248/healthz >/dev/null 2>&1; do
  if ((SECONDS >= deadline)); then
    log "the kubelet does not answer /healthz ${ready_timeout}s after the restart: see journalctl -u k3s-agent (the next run restarts it again)"
    exit 1
  fi
  sleep 1
done
rm -f "$restart_pending"
log "k3s agent $("$k3s" --version | awk 'NR == 1 { print $3 }') ready"

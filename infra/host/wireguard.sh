#!/usr/bin/env bash
# A WireGuard server (wg-quick) whose clients are NATed into the VPC. Peers are read from stdin, one
# "name,publickey,address/32" per line. Prints the server's public key on stdout, and nothing else.
#
#   WG_ADDRESS=10.99.0.1/24 WG_NAT_CIDRS="172.31.0.0/16 3.19.192.157/32" wireguard.sh < peers
#
# WG_ADDRESS    the server's address on the tunnel, with the clients' prefix length
# WG_NAT_CIDRS  where clients may go (space-separated): their traffic leaves masqueraded as this host
# WG_PORT       UDP port; default 51820
# WG_DIR        default /etc/wireguard; WG_INTERFACE default wg0
# WG_SYSCTL_CONF  turns IPv4 forwarding on; default /etc/sysctl.d/60-katforge-wireguard.conf
#
# Runs as root. The private key is generated here, once, and never leaves the host: the interface
# configuration only points at it. Does nothing when the configuration is unchanged and running; a
# change of peers only is applied to the running interface, so connected clients keep their tunnel.
set -euo pipefail

log() { printf 'wireguard: %s\n' "$*" >&2; }

: "${WG_ADDRESS:?WG_ADDRESS is required, e.g. 10.99.0.1/24}"
: "${WG_NAT_CIDRS:?WG_NAT_CIDRS is required, e.g. 172.31.0.0/16}"
read -ra destinations <<<"$WG_NAT_CIDRS"
port=${WG_PORT:-51820}
dir=${WG_DIR:-/etc/wireguard}
interface=${WG_INTERFACE:-wg0}
key=$dir/server.key
unit=wg-quick@$interface

if ! command -v wg-quick >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q update >&2
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q install -y wireguard-tools >&2
fi

umask 077
mkdir -p "$dir"
if [[ ! -s $key ]]; then
  wg genkey >"$key"
  log "generated the server key"
fi

forwarding=${WG_SYSCTL_CONF:-/etc/sysctl.d/60-katforge-wireguard.conf}
if [[ ! -e $forwarding ]]; then
  echo "net.ipv4.ip_forward = 1" >"$forwarding"
  sysctl -q -p "$forwarding"
  log "IPv4 forwarding on"
fi

candidate=$(mktemp)
trap 'rm -f "$candidate"' EXIT
{
  echo "# Managed by katforge (infra/host/wireguard.sh): changes made here are overwritten."
  echo "[Interface]"
  echo "Address = $WG_ADDRESS"
  echo "ListenPort = $port"
  echo "PostUp = wg set %i private-key $key"
  # iptables reads WG_ADDRESS as the clients' network. NAT makes their traffic the VPN host's own,
  # so the VPC needs no route back to the tunnel and security groups see the VPN host as the source.
  # Clients go to the destinations and nowhere else.
  # wg-quick runs the hooks under errexit: a deletion that fails (a rule already gone) would stop
  # `down` half-way and leave the interface up, so deletions may fail.
  for action in A D; do
    if [[ $action == A ]]; then hook=PostUp tolerate=""; else hook=PreDown tolerate=" || true"; fi
    for destination in "${destinations[@]}"; do
      echo "$hook = iptables -t nat -$action POSTROUTING -s $WG_ADDRESS -d $destination -j MASQUERADE$tolerate"
      echo "$hook = iptables -$action FORWARD -i %i -d $destination -j ACCEPT$tolerate"
    done
    echo "$hook = iptables -$action FORWARD -i %i -j DROP$tolerate"
    echo "$hook = iptables -$action FORWARD -o %i -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT$tolerate"
  done
  while IFS=, read -r name public_key address; do
    [[ -z $name ]] && continue
    if [[ -z ${public_key:-} || -z ${address:-} ]]; then
      log "bad peer line '$name': expected name,publickey,address/32"
      exit 2
    fi
    printf '\n# %s\n[Peer]\nPublicKey = %s\nAllowedIPs = %s\n' "$name" "$public_key" "$address"
  done
} >"$candidate"

# The [Interface] settings, which wg-quick up and down act on; comments and blank lines aside.
interface_settings() { awk '/^\[Peer\]/ { exit } NF && !/^#/' "$1"; }
peers() { grep -c '^\[Peer\]' "$1" || true; }

conf=$dir/$interface.conf
if cmp -s "$candidate" "$conf"; then
  if ! systemctl is-active --quiet "$unit"; then
    systemctl enable --now --quiet "$unit"
    log "$unit started"
  fi
elif systemctl is-active --quiet "$unit" &&
  cmp -s <(interface_settings "$candidate") <(interface_settings "$conf"); then
  install -m 0600 "$candidate" "$conf"
  # Checked before use: syncconf reads an empty configuration as "no peers" and drops every client.
  stripped=$(wg-quick strip "$conf")
  wg syncconf "$interface" <(printf '%s\n' "$stripped")
  log "$interface now has $(peers "$conf") peer(s), applied without a restart"
else
  # wg-quick down undoes what the file on disk says: stop with the file that brought the interface up.
  systemctl stop "$unit"
  install -m 0600 "$candidate" "$conf"
  systemctl enable --now --quiet "$unit"
  log "$unit started with $(peers "$conf") peer(s)"
fi

# Without a trailing newline: the output is the key, exactly.
printf '%s' "$(wg pubkey <"$key")"

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
# configuration only points at it. Does nothing when the configuration is unchanged and running.
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
  for action in A D; do
    [[ $action == A ]] && hook=PostUp || hook=PreDown
    for destination in "${destinations[@]}"; do
      echo "$hook = iptables -t nat -$action POSTROUTING -s $WG_ADDRESS -d $destination -j MASQUERADE"
      echo "$hook = iptables -$action FORWARD -i %i -d $destination -j ACCEPT"
    done
    echo "$hook = iptables -$action FORWARD -i %i -j DROP"
    echo "$hook = iptables -$action FORWARD -o %i -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
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

conf=$dir/$interface.conf
if ! cmp -s "$candidate" "$conf"; then
  install -m 0600 "$candidate" "$conf"
  systemctl enable --quiet "$unit"
  systemctl restart "$unit"
  log "$unit restarted with $(grep -c '^\[Peer\]' "$conf") peer(s)"
elif ! systemctl is-active --quiet "$unit"; then
  systemctl enable --now --quiet "$unit"
  log "$unit started"
fi

# Without a trailing newline: the output is the key, exactly.
printf '%s' "$(wg pubkey <"$key")"

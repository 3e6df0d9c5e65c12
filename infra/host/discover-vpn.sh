#!/usr/bin/env bash
# Read-only: the VPN host's WireGuard server, for `make discover` (tools/discover_hosts.py sends this
# script over SSH on stdin): the configuration file's settings and peers, where the server's private
# key lives, and what the running interface has (its public key, port, peers).
#
#   ssh ubuntu@vpn.katforge.com sudo -n bash -s < discover-vpn.sh
#
# WG_DIR        default /etc/wireguard; WG_INTERFACE default wg0
# WG_NETNS      the network namespace the interface lives in; default the host's own
#
# Runs as root (the configuration is root's alone). Changes nothing. Prints one fact a line,
# "<kind><TAB><field>...". Never a private or preshared key: their lines print as [redacted], in any case
# (wg and wg-quick read keys and section names in any case), and the running interface is asked only for
# public values (never `wg show ... private-key` or `dump`).
set -uo pipefail

REDACTED='[redacted]'
dir=${WG_DIR:-/etc/wireguard}
interface=${WG_INTERFACE:-wg0}
conf=$dir/$interface.conf

emit() { local IFS=$'\t'; printf '%s\n' "$*"; }
# wg and ip, in the interface's network namespace.
in_netns() { if [[ -n ${WG_NETNS:-} ]]; then ip netns exec "$WG_NETNS" "$@"; else "$@"; fi; }

# Read whole before anything runs, and with stdin closed: the script itself arrives on stdin (bash -s),
# and nothing it runs may read the rest of it.
main() {
  emit wg-interface "$interface"
  if [[ -r $conf ]]; then
    emit wg-conf "$conf"
    emit wg-conf-header "$(head -n 1 "$conf")"
    # Each setting with the index and name of its section; a comment just above a section names it.
    awk -v redacted="$REDACTED" '
      /^[[:space:]]*#/ { comment = $0; sub(/^[[:space:]]*#[[:space:]]*/, "", comment); next }
      /^[[:space:]]*\[/ { section++; name = $0; gsub(/[][[:space:]]/, "", name)
                          printf "wg-conf-section\t%d\t%s\t%s\n", section, name, comment; comment = ""; next }
      /=/ { key = $0; sub(/[[:space:]]*=.*/, "", key); gsub(/[[:space:]]/, "", key)
            value = $0; sub(/^[^=]*=[[:space:]]*/, "", value); sub(/[[:space:]]+$/, "", value)
            if (tolower(key) == "privatekey" || tolower(key) == "presharedkey") value = redacted
            printf "wg-conf-setting\t%d\t%s\t%s\n", section, key, value }
      { comment = "" }' "$conf"
    # The server's public key from the file's own key, to compare with what clients know.
    inline_key=$(awk '/^[[:space:]]*\[/ { s = tolower($0); gsub(/[[:space:]]/, "", s) }
      s == "[interface]" && tolower($0) ~ /^[[:space:]]*privatekey[[:space:]]*=/ {
        sub(/^[^=]*=[[:space:]]*/, ""); sub(/[[:space:]]*(#.*)?$/, ""); print; exit }' "$conf")
    if [[ -n $inline_key ]]; then
      emit wg-conf-public-key "$(wg pubkey <<<"$inline_key" 2>/dev/null || echo -)"
    fi
    unset inline_key
  else
    emit wg-conf-absent "$conf"
  fi

  # A key file the interface is pointed at (PostUp = wg set %i private-key <file>), or wireguard.sh's.
  key_files=("$dir/server.key")
  if [[ -r $conf ]]; then
    while IFS= read -r file; do key_files+=("${file//%i/$interface}"); done < <(
      grep -oE 'private-key[[:space:]]+[^[:space:];]+' "$conf" | awk '{ print $2 }')
  fi
  for file in $(printf '%s\n' "${key_files[@]}" | LC_ALL=C sort -u); do
    if [[ -s $file ]]; then
      emit wg-key-file "$file" "$(wg pubkey <"$file" 2>/dev/null || echo -)"
    fi
  done

  if in_netns ip link show dev "$interface" >/dev/null 2>&1; then
    emit wg-running "$interface"
    emit wg-running-public-key "$(in_netns wg show "$interface" public-key)"
    emit wg-running-listen-port "$(in_netns wg show "$interface" listen-port)"
    in_netns ip -o -4 addr show dev "$interface" | awk '{ print "wg-running-address\t" $4 }'
    # "publickey<TAB>address address...", or "(none)"
    in_netns wg show "$interface" allowed-ips | while IFS=$'\t' read -r public_key ips; do
      [[ -n $public_key ]] && emit wg-running-peer "$public_key" "${ips// /,}"
    done
  else
    emit wg-not-running "$interface"
  fi
  emit ip-forward "$(in_netns sysctl -n net.ipv4.ip_forward 2>/dev/null || echo -)"
}

main </dev/null
exit 0

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
# WG_PRINT_INTERFACE=1  prints the [Interface] section this run would write, and does nothing else (for
#               make preflight, tools/preflight.py: which live PostUp/PostDown rules it would not keep)
#
# Runs as root. The private key lives in $WG_DIR/server.key and never leaves the host; it appears on
# no command line: the interface configuration only points at the file, and `wg syncconf` reads it from
# a private temporary file. Does nothing when the configuration is unchanged and the running interface
# has its key and its peers (keys, preshared keys, addresses); else, as for a change of peers only, the
# file is applied to the running interface, so connected clients keep their tunnel.
#
# Adopting a server set up by hand (a wg0.conf this script did not write): its inline PrivateKey
# moves to the key file, so clients keep the server they know. The run refuses, changing nothing,
# when the live address or port differ from the inputs, or when a peer the host serves (in the
# file or on the running interface) is missing from the peers given: each is listed with the command
# that adds it to the configuration. The replaced file is kept as $WG_DIR/<interface>.conf.pre-katforge
# (mode 0600: it holds the key), and each later replacement's predecessor as <interface>.conf.bak.
# A live peer's preshared key (which the peer lines cannot carry) moves to $WG_DIR/preshared/, and the
# interface keeps using it: one fixed PostUp hook gives each peer its file, so that a change of peers
# never changes [Interface] (which would restart the interface).
#
# The interface is live when its link exists, whatever systemd says: one brought up by hand
# (`wg-quick up wg0`, the unit inactive) is checked like one systemd runs (its key, peers, address and
# port), and a change of peers is applied to it without a restart. systemd takes it over only when a
# restart is needed anyway (new [Interface] settings, e.g. on adoption): `wg-quick down` with the file
# that brought it up, then the unit starts it, so clients see one short gap, as with any restart, and
# never a second one for the handover alone. Like the files, wg-quick and wg read section names and
# keys in any case and ignore what follows a '#'; so does this script.
set -euo pipefail

log() { printf 'wireguard: %s\n' "$*" >&2; }

: "${WG_ADDRESS:?WG_ADDRESS is required, e.g. 10.99.0.1/24}"
: "${WG_NAT_CIDRS:?WG_NAT_CIDRS is required, e.g. 172.31.0.0/16}"
read -ra destinations <<<"$WG_NAT_CIDRS"
port=${WG_PORT:-51820}
dir=${WG_DIR:-/etc/wireguard}
interface=${WG_INTERFACE:-wg0}
key_file=$dir/server.key
conf=$dir/$interface.conf
unit=wg-quick@$interface
header="# Managed by katforge (infra/host/wireguard.sh): changes made here are overwritten."

# The [Interface] section: the same whatever the peers, so that a change of peers leaves it as it is.
interface_section() {
  echo "[Interface]"
  echo "Address = $WG_ADDRESS"
  echo "ListenPort = $port"
  echo "PostUp = wg set %i private-key $key_file"
  # Each peer with a key file in preshared/ (named as psk_file names it) gets it; the same line
  # whatever the peers. No '#': wg-quick cuts there.
  # shellcheck disable=SC2016 # expanded by wg-quick's hook, not here
  printf 'PostUp = for peer in $(wg show %%i peers); do psk=%s/$(echo "$peer" | tr /+ _-).key; [ ! -s "$psk" ] || wg set %%i peer "$peer" preshared-key "$psk"; done\n' "$dir/preshared"
  # iptables reads WG_ADDRESS as the clients' network. NAT makes their traffic the VPN host's own,
  # so the VPC needs no route back to the tunnel and security groups see the VPN host as the source.
  # Clients go to the destinations and nowhere else.
  # wg-quick runs the hooks under errexit: a deletion that fails (a rule already gone) would stop
  # `down` half-way and leave the interface up, so deletions may fail.
  local action hook tolerate destination
  for action in A D; do
    if [[ $action == A ]]; then hook=PostUp tolerate=""; else hook=PreDown tolerate=" || true"; fi
    for destination in "${destinations[@]}"; do
      echo "$hook = iptables -t nat -$action POSTROUTING -s $WG_ADDRESS -d $destination -j MASQUERADE$tolerate"
      echo "$hook = iptables -$action FORWARD -i %i -d $destination -j ACCEPT$tolerate"
    done
    echo "$hook = iptables -$action FORWARD -i %i -j DROP$tolerate"
    echo "$hook = iptables -$action FORWARD -o %i -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT$tolerate"
  done
}
case ${WG_PRINT_INTERFACE:-} in
  "") ;;
  1) interface_section; exit 0 ;;
  *) log "WG_PRINT_INTERFACE=$WG_PRINT_INTERFACE: expected 1 (print the [Interface] section, change nothing) or unset"
     exit 2 ;;
esac

if ! command -v wg-quick >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q update >&2
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q install -y wireguard-tools >&2
fi

umask 077
mkdir -p "$dir"
work=$(mktemp -d "$dir/.katforge.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- what the host has now ---------------------------------------------------------------------

# Prints the value of `Key = value` in the [Interface] section of the file $2 (wg-quick's parse_options).
interface_value() {
  awk -v key="${1,,}" '{ sub(/#.*/, "") }
    /^[ \t]*\[/ { section = tolower($0); gsub(/[ \t]/, "", section); next }
    section == "[interface]" && index($0, "=") {
      k = tolower(substr($0, 1, index($0, "=") - 1)); gsub(/[ \t]/, "", k)
      if (k == key) { v = substr($0, index($0, "=") + 1); gsub(/^[ \t]+|[ \t]+$/, "", v); print v; exit } }' "$2"
}

# Prints "publickey allowedips presharedkey name" for each [Peer] of the file $1 ("-" for what it lacks).
# The name comes from the comment line just above the section (as this script writes it), made a name
# the configuration accepts (infra/settings.py, _LABEL): lowercase letters, digits and inner hyphens.
conf_peers() {
  awk 'function flush() { if (key != "") print key, (ips == "" ? "-" : ips), (psk == "" ? "-" : psk), (name == "" ? "-" : name); key = ips = psk = "" }
       /^[ \t]*#/ { comment = tolower($0); sub(/^[ \t]*#/, "", comment); gsub(/[^a-z0-9]+/, "-", comment)
                    comment = substr(comment, 1, 64); gsub(/^-+|-+$/, "", comment); comment = substr(comment, 1, 63)
                    sub(/-+$/, "", comment); next }
       { sub(/#.*/, "") }
       /^[ \t]*\[/ { flush(); s = tolower($0); gsub(/[ \t]/, "", s); peer = (s == "[peer]"); name = peer ? comment : ""; comment = ""; next }
       NF { comment = "" }
       peer && index($0, "=") {
         k = tolower(substr($0, 1, index($0, "=") - 1)); gsub(/[ \t]/, "", k); v = substr($0, index($0, "=") + 1); gsub(/[ \t]/, "", v)
         if (k == "publickey") key = v; else if (k == "allowedips") ips = (ips == "" ? v : ips "," v); else if (k == "presharedkey") psk = v }
       END { flush() }' "$1"
}

managed=false
live_key=""
# The peers the host serves, in the order it lists them: its file, then the running interface.
live_order=()
declare -A live_ips=() live_names=() live_psks=()
if [[ -e $conf ]]; then
  if [[ $(head -n 1 "$conf") == "$header" ]]; then managed=true; fi
  live_key=$(interface_value PrivateKey "$conf")
  while read -r public_key ips psk name; do
    live_order+=("$public_key")
    live_ips[$public_key]=$ips
    live_names[$public_key]=$name
    [[ $psk == "-" ]] || live_psks[$public_key]=$psk
  done < <(conf_peers "$conf")
fi
# A file this script wrote lists the peers it was given: those may go. Every other peer the host
# serves was added by hand and must be in the configuration before anything changes.
declare -A ours=()
if $managed; then
  for public_key in "${!live_ips[@]}"; do ours[$public_key]=1; done
fi
# The link is what clients use; the unit may say otherwise (brought up or taken down by hand).
unit_active=false
systemctl is-active --quiet "$unit" && unit_active=true
running=false
running_public=""
if ip link show dev "$interface" >/dev/null 2>&1; then
  running=true
  running_public=$(wg show "$interface" public-key)
  # "publickey<TAB>address address...", or "(none)" for a peer without addresses.
  while IFS=$'\t' read -r public_key ips; do
    [[ -n $public_key && -z ${live_ips[$public_key]:-} ]] || continue
    ips=${ips// /,}
    live_order+=("$public_key")
    live_ips[$public_key]=${ips/"(none)"/-}
  done < <(wg show "$interface" allowed-ips)
  while IFS=$'\t' read -r public_key psk; do
    [[ -n $public_key && $psk != "(none)" && -z ${live_psks[$public_key]:-} ]] && live_psks[$public_key]=$psk
  done < <(wg show "$interface" preshared-keys)
fi

# --- the configuration asked for ---------------------------------------------------------------

peer_lines=()
declare -A wanted=() names=()
while IFS=, read -r name public_key address; do
  [[ -z $name ]] && continue
  if [[ -z ${public_key:-} || -z ${address:-} ]]; then
    log "bad peer line '$name': expected name,publickey,address/32"
    exit 2
  fi
  peer_lines+=("$name,$public_key,$address")
  wanted[$public_key]=$address
  names[$name]=1
done

# --- refusals: nothing has changed yet ---------------------------------------------------------

problems=()
if ! $managed && { $running || [[ -e $conf ]]; }; then
  # What clients use: the running interface's, else the file's.
  if $running; then
    live_address=$(ip -o addr show dev "$interface" scope global | awk '{ print $4 }' | paste -sd, -)
    live_port=$(wg show "$interface" listen-port)
  else
    live_address=$(interface_value Address "$conf")
    live_port=$(interface_value ListenPort "$conf")
  fi
  if [[ -n $live_address && $live_address != "$WG_ADDRESS" ]]; then
    problems+=("the live Address is $live_address, the inputs say $WG_ADDRESS: clients would lose their routes."
      "  Keep the live one: pulumi config set katforge:vpnClientCidr <the network of $live_address> --stack prod")
  fi
  if [[ -n $live_port && $live_port != "$port" ]]; then
    problems+=("the live ListenPort is $live_port, the inputs say $port: clients would dial the wrong port."
      "  Keep the live one: run with WG_PORT=$live_port")
  fi
fi
index=${#peer_lines[@]}
for public_key in "${live_order[@]}"; do
  if [[ -n ${wanted[$public_key]:-} ]]; then
    if ! $managed && [[ ${live_ips[$public_key]} != "${wanted[$public_key]}" ]]; then
      problems+=("peer $public_key has AllowedIPs ${live_ips[$public_key]} on this host but ${wanted[$public_key]} in the configuration: the client would lose its tunnel.")
    fi
  elif [[ -z ${ours[$public_key]:-} ]]; then
    name=${live_names[$public_key]:-"-"}
    [[ $name != "-" && -z ${names[$name]:-} ]] || name=peer$index
    names[$name]=1
    problems+=("live peer $public_key (${live_ips[$public_key]}) is missing from the configuration; add it with:"
      "  pulumi config set --path 'katforge:wireguardPeers[$index]' '$name,$public_key,${live_ips[$public_key]}' --stack prod")
    index=$((index + 1))
  fi
done

# The key: the key file, else the live file's inline key; a new one only for a new server.
if [[ -s $key_file ]]; then
  key=$(<"$key_file")
  key_source=$key_file
elif [[ -n $live_key ]]; then
  key=$live_key
  key_source="the PrivateKey in $conf"
else
  key=""
fi
key_public=""
[[ -n $key ]] && key_public=$(wg pubkey <<<"$key")
if $running && [[ $running_public != "(none)" ]]; then
  if [[ -z $key ]]; then
    problems+=("$interface runs with a private key that is neither in $key_file nor in $conf: put it in $key_file (mode 0600) and run again.")
  elif [[ $running_public != "$key_public" ]]; then
    problems+=("$interface runs with public key $running_public, but $key_source gives $key_public: clients know the running one. Put its private key in $key_file and run again.")
  fi
fi

if $running && [[ ! -e $conf ]]; then
  problems+=("$interface is up, but $conf does not exist: it was brought up from another file. Take it down with that file (wg-quick down <file>), or put the file at $conf, and run again.")
fi

if [[ ${#problems[@]} -gt 0 ]]; then
  log "refusing to change $interface; nothing was changed:"
  printf '  %s\n' "${problems[@]}" >&2
  exit 1
fi

# --- apply ---------------------------------------------------------------------------------------

if [[ -z $key ]]; then
  key=$(wg genkey)
  key_public=$(wg pubkey <<<"$key")
  log "generated the server key"
fi
if [[ ! -s $key_file ]]; then
  printf '%s\n' "$key" >"$work/server.key"
  mv "$work/server.key" "$key_file"
  log "the server key is now in $key_file"
fi
# A peer's preshared key file: base64's / and + are not for file names.
psk_file() { local name=${1//\//_}; echo "$dir/preshared/${name//+/-}.key"; }
mkdir -p "$dir/preshared"
for public_key in "${!live_psks[@]}"; do
  file=$(psk_file "$public_key")
  if [[ -n ${wanted[$public_key]:-} && ! -s $file ]]; then
    printf '%s\n' "${live_psks[$public_key]}" >"$work/psk"
    mv "$work/psk" "$file"
    log "the preshared key of peer $public_key is now in $file"
  fi
done

forwarding=${WG_SYSCTL_CONF:-/etc/sysctl.d/60-katforge-wireguard.conf}
if [[ $(cat "$forwarding" 2>/dev/null) != "net.ipv4.ip_forward = 1" ]]; then
  echo "net.ipv4.ip_forward = 1" >"$forwarding"
fi
# The runtime value, not only the file: anything may have turned it off since.
if [[ $(sysctl -n net.ipv4.ip_forward) != 1 ]]; then
  sysctl -q -p "$forwarding"
  [[ $(sysctl -n net.ipv4.ip_forward) == 1 ]] || { log "IPv4 forwarding stays off"; exit 1; }
  log "IPv4 forwarding on"
fi

candidate=$work/$interface.conf
{
  echo "$header"
  interface_section
  for line in "${peer_lines[@]}"; do
    IFS=, read -r name public_key address <<<"$line"
    printf '\n# %s\n[Peer]\nPublicKey = %s\nAllowedIPs = %s\n' "$name" "$public_key" "$address"
  done
} >"$candidate"

# The [Interface] settings, which wg-quick up and down act on; comments and blank lines aside.
interface_settings() { awk '/^\[Peer\]/ { exit } NF && !/^#/' "$1"; }

# Gives the running interface the file's peers and the key, without taking it down. The key reaches
# `wg` in a file only root can read, never as an argument.
sync_running() {
  local stripped runtime=$work/runtime.conf
  # Checked before use: syncconf reads an empty configuration as "no peers" and drops every client.
  stripped=$(wg-quick strip "$conf")
  [[ $stripped == *"[Interface]"* ]] || { log "wg-quick strip gave no [Interface] for $conf"; exit 1; }
  local line file
  while IFS= read -r line; do
    printf '%s\n' "$line"
    if [[ $line == "[Interface]" ]]; then printf 'PrivateKey = %s\n' "$key"; fi
    if [[ $line =~ ^PublicKey\ =\ (.+)$ ]]; then
      file=$(psk_file "${BASH_REMATCH[1]}")
      [[ ! -s $file ]] || printf 'PresharedKey = %s\n' "$(<"$file")"
    fi
  done <<<"$stripped" >"$runtime"
  wg syncconf "$interface" "$runtime"
  rm -f "$runtime"
}

# The file being replaced stays beside it: the original on adoption, and the latest before each change.
keep_backup() {
  if ! $managed && [[ ! -e $conf.pre-katforge ]]; then
    install -m 0600 "$conf" "$conf.pre-katforge"
  fi
  install -m 0600 "$conf" "$conf.bak"
}

peers() { grep -c '^\[Peer\]' "$1" || true; }

# "publickey presharedkey allowedips" per peer, sorted, with the addresses sorted and "(none)" for what a
# peer lacks, as `wg show dump` prints it: of the running interface, and of what $conf and the preshared
# keys give it (sync_running's input). Equal when the interface serves every client as the file says.
sorted_ips() {
  if [[ $1 == - || $1 == "(none)" ]]; then echo "(none)"; else tr , '\n' <<<"$1" | sort | paste -sd, -; fi
}
running_peers() {
  local public_key psk ips rest
  # The first line is the interface's own (its private key): skipped unread.
  wg show "$interface" dump | tail -n +2 | while IFS=$'\t' read -r public_key psk _ ips rest; do
    echo "$public_key $psk $(sorted_ips "$ips")"
  done | sort
}
file_peers() {
  local public_key ips psk file
  conf_peers "$conf" | while read -r public_key ips _ _; do
    file=$(psk_file "$public_key")
    psk="(none)"
    [[ ! -s $file ]] || psk=$(<"$file")
    # An all-zero key is no key: wg shows it as (none).
    [[ $psk != AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= ]] || psk="(none)"
    echo "$public_key $psk $(sorted_ips "$ips")"
  done | sort
}

# Before a start: what brought the interface up takes it down, with the file it used ($conf, not yet
# replaced), so that its PostDown undoes its PostUp: systemd, or wg-quick as the operator did by hand.
# A unit systemd still counts as active though its link is gone is stopped too (its down then fails).
stop_interface() {
  if $unit_active; then
    if ! systemctl stop "$unit" && $running; then
      log "systemctl stop $unit failed; $interface is still up"
      exit 1
    fi
  elif $running; then
    wg-quick down "$conf"
  fi
}

if $running && cmp -s "$candidate" "$conf"; then
  # The file is right; the interface may not be: a peer removed by hand (`wg set ... remove`), or a
  # run that failed between installing the file and syncing it. A rerun puts it right.
  if [[ $running_public != "$key_public" ]]; then
    sync_running
    log "$interface had lost its private key; restored from $key_file"
  elif [[ $(running_peers) != "$(file_peers)" ]]; then
    # What differed, by public key and addresses only (a preshared key is never printed).
    while read -r line; do log "  $line"; done < <(diff <(running_peers | cut -d' ' -f1,3) <(file_peers | cut -d' ' -f1,3) |
      sed -n 's/^< /running, not in the file: /p; s/^> /in the file, not running: /p')
    sync_running
    log "$interface's peers differed from $conf; it now has its $(peers "$conf") peer(s), applied without a restart"
  fi
elif $running && [[ -e $conf ]] && cmp -s <(interface_settings "$candidate") <(interface_settings "$conf"); then
  keep_backup
  install -m 0600 "$candidate" "$conf"
  sync_running
  log "$interface now has $(peers "$conf") peer(s), applied without a restart"
else
  replaced=false
  if ! cmp -s "$candidate" "$conf"; then
    [[ ! -e $conf ]] || keep_backup
    replaced=true
  fi
  stop_interface
  if $replaced; then install -m 0600 "$candidate" "$conf"; fi
  if ! systemctl enable --now --quiet "$unit"; then
    if $replaced && [[ -e $conf.bak ]]; then
      log "$unit failed to start with the new configuration; starting it again with the previous one"
      systemctl stop "$unit" || true
      install -m 0600 "$conf.bak" "$conf"
      systemctl enable --now --quiet "$unit" || log "$unit does not start with the previous configuration either"
    fi
    exit 1
  fi
  unit_active=true
  log "$unit started with $(peers "$conf") peer(s)"
fi
if ! $unit_active; then
  # Up by hand, and left up: no restart for the handover alone. At boot systemd brings it up.
  systemctl is-enabled --quiet "$unit" || systemctl enable --quiet "$unit"
  log "$interface runs outside systemd (brought up by hand): $unit takes it over at the next change that"
  log "needs a restart, or now with: wg-quick down $conf && systemctl start $unit"
fi

# Checked on the interface itself: the key it runs with is the key file's.
actual=$(wg show "$interface" public-key)
if [[ $actual != "$key_public" ]]; then
  log "$interface runs with public key $actual, expected $key_public"
  exit 1
fi
if [[ $(running_peers) != "$(file_peers)" ]]; then
  log "$interface does not serve the peers of $conf as the file says (wg show $interface allowed-ips)"
  exit 1
fi
# Without a trailing newline: the output is the key, exactly.
printf '%s' "$key_public"

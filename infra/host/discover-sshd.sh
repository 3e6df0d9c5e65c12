#!/usr/bin/env bash
# Read-only: the sshd settings host-baseline.sh sets, as sshd has them in effect (`sshd -T`), for
# `make discover` (tools/discover_hosts.py sends this ahead of discover-k3s.sh or discover-vpn.sh, in the
# same `bash -s`), so that preflight can say what the baseline changes for whoever logs in today.
#
# SSHD_CONFIG   sshd's main configuration; default /etc/ssh/sshd_config
#
# Runs as root (sshd -T reads the host keys). Changes nothing. Prints "sshd-setting<TAB><key><TAB><value>"
# for each of those settings (keys in lower case, as sshd -T prints them), or "sshd-error<TAB><message>".
# Nothing secret: sshd -T prints settings, never key material.

# host-baseline.sh's ssh_settings (tests/test_discover_hosts.py keeps the two lists alike).
SSHD_KEYS='passwordauthentication kbdinteractiveauthentication permitrootlogin'

discover_sshd() {
  local sshd effective
  sshd=$(command -v sshd || echo /usr/sbin/sshd)
  if ! effective=$("$sshd" -T -f "${SSHD_CONFIG:-/etc/ssh/sshd_config}" 2>&1); then
    printf 'sshd-error\t%s\n' "$(tail -n 1 <<<"$effective")"
    return
  fi
  awk -v keys="$SSHD_KEYS" 'BEGIN { n = split(keys, list, " "); for (i = 1; i <= n; i++) wanted[list[i]] = 1 }
    $1 in wanted { print "sshd-setting\t" $1 "\t" $2 }' <<<"$effective"
}

# Stdin closed: the rest of the script arrives on it (bash -s).
discover_sshd </dev/null

#!/usr/bin/env bash
# Mails the operators when a database has had no successful backup for BACKUP_MAX_AGE_HOURS (default 26:
# a daily run, plus time for a slow or retried one), again every BACKUP_ALERT_REPEAT_HOURS (default 24)
# while that lasts. Installed as /usr/local/sbin/katforge-backup-watchdog, run hourly by
# katforge-backup-watchdog.timer. It catches what the backup cannot report itself: a run that never
# started (timer disabled, host down at the time), or one killed outright.
#
#   BACKUP_TARGETS="STAGE:DATABASE ..." backup-watchdog.sh
#
# BACKUP_STATE_DIR  where katforge-backup notes each database's last success; default /var/lib/katforge.
# ALERT_COMMAND     what mails the alert; default katforge-alert.
# Exit status 1 while a backup is overdue, so the unit shows failed too.
set -euo pipefail

log() { printf 'katforge-backup-watchdog: %s\n' "$*" >&2; }

state_dir=${BACKUP_STATE_DIR:-/var/lib/katforge}/backup
max_age=$(( ${BACKUP_MAX_AGE_HOURS:-26} * 3600 ))
repeat=$(( ${BACKUP_ALERT_REPEAT_HOURS:-24} * 3600 ))
read -r -a targets <<<"${BACKUP_TARGETS:-}"
[[ ${#targets[@]} -gt 0 ]] || { log "BACKUP_TARGETS is empty: nothing to watch"; exit 2; }
mkdir -p "$state_dir"
# A database never backed up is overdue counting from the first watch, not from 1970.
[[ -f $state_dir/watching-since ]] || touch "$state_dir/watching-since"
now=$(date +%s)
when() { date -u -d "@$1" +%Y-%m-%dT%H:%MZ; }

overdue=()
for target in "${targets[@]}"; do
  noted="$state_dir/${target%%:*}.${target#*:}.last-success"
  if [[ -f $noted ]]; then
    last=$(stat -c %Y "$noted")
    what="last successful backup $(when "$last"): $(cat "$noted")"
  else
    last=$(stat -c %Y "$state_dir/watching-since")
    what="no successful backup since the watch began at $(when "$last")"
  fi
  if (( now - last > max_age )); then
    overdue+=("$target: $what")
  fi
done

alerted="$state_dir/overdue-alerted"
if [[ ${#overdue[@]} -eq 0 ]]; then
  rm -f "$alerted"
  exit 0
fi
printf '%s\n' "${overdue[@]}" | sed 's/^/overdue /' >&2
if [[ -f $alerted ]] && (( now - $(stat -c %Y "$alerted") < repeat )); then
  log "already mailed at $(when "$(stat -c %Y "$alerted")"); the next mail in at most $(( repeat / 3600 )) hours"
  exit 1
fi
if printf '%s\n' "No successful backup for more than $(( max_age / 3600 )) hours:" "${overdue[@]}" "" \
     "See: systemctl status katforge-backup.service; journalctl -u katforge-backup --since -2d" \
   | "${ALERT_COMMAND:-katforge-alert}" "backup overdue"; then
  touch "$alerted"
else
  log "the alert could not be mailed (${ALERT_COMMAND:-katforge-alert} failed); trying again next hour"
fi
exit 1

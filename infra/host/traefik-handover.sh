#!/usr/bin/env bash
# Hand Traefik's configuration over from the operators' manifest file to Pulumi, on the k3s host, after
# k3s is installed and before Pulumi declares any cluster object.
#
#   traefik-handover.sh
#
# K3S_BIN_DIR          where k3s is; default /usr/local/bin (as k3s-install.sh)
# K3S_SERVER_DIR       default /var/lib/rancher/k3s/server
# TRAEFIK_MANIFEST     default $K3S_SERVER_DIR/manifests/traefik-config.yaml
# TRAEFIK_MANIFEST_KEEP  where it goes; default $K3S_SERVER_DIR/traefik-config.yaml.pre-katforge
# K3S_API_TIMEOUT      seconds to wait for k3s to serve its Addon and HelmChartConfig types; default 300
# TRAEFIK_SETTLE_SECONDS  how long to wait for k3s's next rescan of the manifests after a removal; default 20
#
# Runs as root. The operators configured k3s's Traefik with a HelmChartConfig in the manifest file above,
# the DNS challenge's AWS key inline. k3s's deploy controller applies every file of the manifests directory
# on each start and whenever one changes, over whatever Pulumi set; removing a file deletes nothing it
# applied (k3s-io/k3s pkg/deploy/controller.go: listFilesIn deploys the files it finds; only a file
# disabled by --disable is deleted with its objects). So, in this order:
# 1. the file moves out of the manifests directory, root-only (0600), kept for the record: it holds the old
#    key, which is rotated once Pulumi's user works. This script never reads it, nor prints it.
# 2. HelmChartConfig kube-system/traefik is deleted only if the deploy controller applied it from that
#    file. wrangler's apply marks what it applies with its owner (rancher/wrangler
#    pkg/apply/desiredset_apply.go: LabelGVK, LabelName, LabelNamespace), here the file's Addon,
#    k3s.cattle.io/v1 kube-system/traefik-config (controller.go: deploy() applies WithOwner(&addon); an
#    Addon is named after its file, up to the first dot). Pulumi then creates its own. A HelmChartConfig
#    without those annotations is left alone, for `katforge:imports` to adopt (tools/discover_cluster.py
#    reads the same annotations). While the Addon's file still exists (another data-dir, a .yml) nothing
#    is deleted: k3s would apply it again within 15 s.
# 3. The Addon goes too: its file is gone, and nothing applies it again.
#
# On the live host the first run changes Traefik twice: once its HelmChartConfig is deleted,
# helm-controller upgrades Traefik to the chart's defaults (k3s-io/helm-controller
# pkg/controllers/chart/chart.go re-renders a chart when its config goes: rancher/wrangler
# pkg/relatedresource resolves deletions too), until Pulumi's HelmChartConfig lands seconds later and it
# upgrades again. Meanwhile HTTPS answers with Traefik's default certificate; the issued certificates stay
# on Traefik's volume (its PVC is kept). Pulumi cannot create its object first: it has the same name.
# A later run finds nothing to do and says so.
set -euo pipefail

log() { printf 'traefik-handover: %s\n' "$*" >&2; }

k3s=${K3S_BIN_DIR:-/usr/local/bin}/k3s
server_dir=${K3S_SERVER_DIR:-/var/lib/rancher/k3s/server}
manifest=${TRAEFIK_MANIFEST:-$server_dir/manifests/traefik-config.yaml}
keep=${TRAEFIK_MANIFEST_KEEP:-$server_dir/traefik-config.yaml.pre-katforge}

NAMESPACE=kube-system
CONFIG=helmchartconfigs.helm.cattle.io/traefik
ADDON_NAME=traefik-config
ADDON=addons.k3s.cattle.io/$ADDON_NAME
OWNER_GVK="k3s.cattle.io/v1, Kind=Addon"

kubectl() { "$k3s" kubectl --namespace "$NAMESPACE" "$@"; }
# FIELDS: the fields of an object in kube-system, by kubectl's JSONPath, one each; all empty when there
# is no such object. Only these fields leave the API server: the HelmChartConfig's values and wrangler's
# `applied` annotation hold the old key.
read_fields() {
  local object=$1 path template="" text
  shift
  for path in "$@"; do template+="{$path}{\"\\n\"}"; done
  if ! text=$(kubectl get "$object" --ignore-not-found --output "jsonpath=$template"); then
    log "could not read $object in $NAMESPACE (is k3s up? k3s kubectl get --raw=/readyz)"
    exit 1
  fi
  mapfile -t FIELDS <<<"$text"
}

changed=false

# --- 1. the file -----------------------------------------------------------------------------------

if [[ -e $manifest ]]; then
  if [[ -e $keep ]] && ! cmp -s "$manifest" "$keep"; then
    log "$manifest is back and differs from the copy kept at $keep; nothing was changed."
    log "Keep what you need of either (as root; never print them), remove the other, and run this again."
    exit 1
  fi
  # Root-only before it moves, so that no copy of the key is ever readable by others.
  chown root:root "$manifest"
  chmod 0600 "$manifest"
  mv -f "$manifest" "$keep"
  log "moved $manifest to $keep (0600): k3s no longer applies it"
  changed=true
fi

# --- 2. the HelmChartConfig the file made ----------------------------------------------------------

# A new k3s answers /readyz (k3s-install.sh waits for it) before it has registered its own resource types.
deadline=$((SECONDS + ${K3S_API_TIMEOUT:-300}))
until "$k3s" kubectl get --raw=/apis/k3s.cattle.io/v1 >/dev/null 2>&1 &&
  "$k3s" kubectl get --raw=/apis/helm.cattle.io/v1 >/dev/null 2>&1; do
  if ((SECONDS >= deadline)); then
    log "k3s does not serve k3s.cattle.io/v1 and helm.cattle.io/v1 after ${K3S_API_TIMEOUT:-300}s: see journalctl -u k3s"
    exit 1
  fi
  sleep 1
done

# Removes what the file made: its HelmChartConfig (only if the file's Addon applied it) and the Addon.
# Sets `removed` when it deleted something.
hand_over() {
  removed=false
  read_fields "$ADDON" .metadata.name .spec.source
  addon_name=${FIELDS[0]:-} addon_source=${FIELDS[1]:-}
  if [[ -n $addon_name && -n $addon_source && -e $addon_source ]]; then
    # Another file of that name (another data-dir, .yml): deleting its object now would only see k3s put it back.
    log "k3s still applies $addon_source (Addon $NAMESPACE/$ADDON_NAME); HelmChartConfig $NAMESPACE/traefik was"
    log "not touched. Move that file out of $(dirname "$addon_source") (TRAEFIK_MANIFEST names it) and run this again."
    exit 1
  fi

  read_fields "$CONFIG" .metadata.name '.metadata.annotations.objectset\.rio\.cattle\.io/owner-gvk' \
    '.metadata.annotations.objectset\.rio\.cattle\.io/owner-namespace' \
    '.metadata.annotations.objectset\.rio\.cattle\.io/owner-name'
  config_name=${FIELDS[0]:-} owner_gvk=${FIELDS[1]:-} owner_namespace=${FIELDS[2]:-} owner_name=${FIELDS[3]:-}
  if [[ -z $config_name ]]; then
    log "no HelmChartConfig $NAMESPACE/traefik: Pulumi creates it"
  elif [[ -z $owner_gvk$owner_namespace$owner_name ]]; then
    log "HelmChartConfig $NAMESPACE/traefik was not applied by k3s from a manifest file: left as it is"
    log "(Pulumi manages it, or imports it)"
  elif [[ $owner_gvk == "$OWNER_GVK" && $owner_namespace == "$NAMESPACE" && $owner_name == "$ADDON_NAME" ]]; then
    kubectl delete "$CONFIG" --ignore-not-found >&2
    log "deleted HelmChartConfig $NAMESPACE/traefik, which k3s had applied from ${addon_source:-$manifest}:"
    log "Pulumi creates its own"
    removed=true
  else
    log "HelmChartConfig $NAMESPACE/traefik belongs to $owner_gvk $owner_namespace/$owner_name, not to the Addon of"
    log "$manifest; it was not touched. If a manifest file applies it (kubectl -n $owner_namespace get addon"
    log "$owner_name -o jsonpath='{.spec.source}'), move that file out of the manifests directory and run this again."
    exit 1
  fi

  # --- 3. the file's Addon ---------------------------------------------------------------------------

  if [[ -n $addon_name ]]; then
    kubectl delete "$ADDON" --ignore-not-found >&2
    log "deleted Addon $NAMESPACE/$ADDON_NAME: its file ${addon_source:-(none)} is gone"
    removed=true
  fi
}

hand_over
if $removed; then
  changed=true
  # A k3s that has just restarted scans its manifests directory once more, and may have read the file just
  # before it moved: after one rescan (k3s rescans every 15 s), hand over again whatever it put back.
  sleep "${TRAEFIK_SETTLE_SECONDS:-20}"
  hand_over
  $removed && log "k3s had applied the file once more as it moved; removed that too"
fi

$changed || log "nothing to do: no Traefik manifest file, no HelmChartConfig or Addon of one"

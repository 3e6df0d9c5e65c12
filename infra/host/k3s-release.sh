# shellcheck shell=bash
# k3s's own release, as its install.sh fetches it; sourced by k3s-install.sh (the server) and
# k3s-agent-install.sh, and installed beside them (infra/bootstrap.py run_script's `libraries`: its text
# is part of their runs' triggers).
# shellcheck disable=SC2154 # $releases, $installed and $work are the sourcing script's

# The release's binary for this machine into $work/k3s, checked against the release's
# sha256sum-<arch>.txt and its own --version; on any mismatch the run stops having changed nothing.
download_k3s() {
  local arch asset url expected actual reported
  case $(uname -m) in
    x86_64) arch=amd64 asset=k3s ;;
    aarch64) arch=arm64 asset=k3s-arm64 ;;
    *) log "unsupported architecture $(uname -m)"; exit 1 ;;
  esac
  url=$releases/${K3S_VERSION//+/%2B}
  log "downloading k3s $K3S_VERSION (was: ${installed:-not installed})"
  curl -sfL --retry 3 -o "$work/sha256sum.txt" "$url/sha256sum-$arch.txt"
  curl -sfL --retry 3 -o "$work/k3s" "$url/$asset"
  expected=$(awk -v asset="$asset" '$2 == asset { print $1 }' "$work/sha256sum.txt")
  actual=$(sha256sum "$work/k3s" | awk '{ print $1 }')
  if [[ -z $expected || $actual != "$expected" ]]; then
    log "the downloaded $asset has sha256 $actual, the release's sha256sum-$arch.txt says '${expected:-nothing}'; nothing was changed"
    exit 1
  fi
  chmod 0755 "$work/k3s"
  reported=$("$work/k3s" --version | awk 'NR == 1 { print $3 }')
  if [[ $reported != "$K3S_VERSION" ]]; then
    log "the downloaded k3s says it is $reported, not $K3S_VERSION; nothing was changed"
    exit 1
  fi
}

# shellcheck shell=bash
# k3s's own release and unit, as its install.sh fetches and writes them; sourced by k3s-install.sh (the
# server) and k3s-agent-install.sh, and installed beside them (infra/bootstrap.py run_script's
# `libraries`: its text is part of their runs' triggers).
# shellcheck disable=SC2154 # $releases, $installed, $work, $k3s, $config_file, $systemd_dir: the sourcing script's

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

# k3s's own unit as install.sh writes it (create_systemd_service_file), without flags: every setting is in
# config.yaml. $1 the unit's name (k3s, k3s-agent), $2 k3s's command (server, agent), $3 the installer.
k3s_unit() {
  cat <<EOF
# Managed by katforge (infra/host/$3): every setting is in $config_file.
[Unit]
Description=Lightweight Kubernetes
Documentation=https://k3s.io
Wants=network-online.target
After=network-online.target

[Install]
WantedBy=multi-user.target

[Service]
Type=notify
EnvironmentFile=-/etc/default/%N
EnvironmentFile=-/etc/sysconfig/%N
EnvironmentFile=-$systemd_dir/$1.service.env
KillMode=process
Delegate=yes
User=root
# Having non-zero Limit*s causes performance problems due to accounting overhead
# in the kernel. We recommend using cgroups to do container-local accounting.
LimitNOFILE=1048576
LimitNPROC=infinity
LimitCORE=infinity
TasksMax=infinity
TimeoutStartSec=0
Restart=always
RestartSec=5s
ExecStartPre=-/sbin/modprobe br_netfilter
ExecStartPre=-/sbin/modprobe overlay
ExecStart=$k3s $2
EOF
}

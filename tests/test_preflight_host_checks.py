"""make preflight decides what the host scripts refuse by running the scripts themselves (their check-only
mode) on a tree rebuilt from what `make discover` read. Here the same live-like host is read by the real
discovery script, checked the way preflight checks it, and then given to the real script: the verdict and
its message must be the same."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import pytest

from tests.test_host_k3s import CONFIG, LIVE_FLAGS, LIVE_UNIT, K3sHost
from tools import discover_hosts, preflight
from tools.discover_targets import targets


def refusal(script: str, result) -> Optional[str]:
    """A real run's refusal as preflight shows one: its log lines as one line."""
    if result.returncode == 0:
        return None
    prefix = f"{script.removesuffix('.sh')}: "
    return " ".join(line.removeprefix(prefix).strip() for line in result.stderr.splitlines() if line.strip())


# --- k3s-install.sh ------------------------------------------------------------------------------------

def discovered_k3s(host: K3sHost) -> dict:
    """What discover-k3s.sh reads on the host (as over SSH, here run in place)."""
    env = {**host.env, "K3S_BIN": str(host.bin / "k3s"), "K3S_DATA_DIR": str(host.root / "data"),
           "PG_BIN_DIR": str(host.root / "no-postgres")}
    result = discover_hosts.subprocess.run(["bash", str(discover_hosts.SCRIPTS["k3s"])], env=env, capture_output=True,
                                           text=True, check=True)
    lines = [line.split("\t") for line in result.stdout.splitlines() if line]
    return discover_hosts.k3s_facts(lines, targets("prod"), [])["k3s"]


def checked(host: K3sHost, version: str, config: str, **env: str) -> Optional[str]:
    facts = discovered_k3s(host)
    with tempfile.TemporaryDirectory() as tree:
        return preflight.host_check("k3s-install.sh", {"K3S_VERSION": version, **env,
                                                       **preflight.k3s_check_tree(Path(tree), facts)},
                                    config, Path(tree))


@pytest.fixture
def host(tmp_path):
    return K3sHost(tmp_path)


def drop_in(host: K3sHost) -> None:
    path = host.systemd / "k3s.service.d" / "override.conf"
    path.parent.mkdir()
    path.write_text(f"[Service]\nExecStart=\nExecStart={host.bin}/k3s server --write-kubeconfig-mode 644\n")


SCENARIOS = {
    # name: (how the live host differs, version, config.yaml, environment of the run)
    "live-flags": (lambda h: h.live(), "v1.34.6+k3s1", CONFIG, {}),
    "live-flags-replaced": (lambda h: h.live(), "v1.34.6+k3s1", CONFIG, {"K3S_REPLACE_LIVE_FLAGS": "1"}),
    "env-file-setting": (lambda h: h.live(flags=LIVE_FLAGS.replace("\t'--write-kubeconfig-mode' \\\n\t'644' \\\n", ""),
                                          env="K3S_KUBECONFIG_MODE='644'\n"), "v1.34.6+k3s1", CONFIG, {}),
    "token-in-config": (lambda h: h.live(), "v1.34.6+k3s1", CONFIG + "token: K10other::server:y\n", {}),
    "drop-in": (lambda h: (h.live(), drop_in(h)), "v1.34.6+k3s1", CONFIG, {"K3S_REPLACE_LIVE_FLAGS": "1"}),
    "downgrade": (lambda h: h.live(), "v1.34.5+k3s1", CONFIG, {"K3S_REPLACE_LIVE_FLAGS": "1"}),
    "unencrypted": (lambda h: h.live(encrypted=False), "v1.34.6+k3s1", CONFIG, {"K3S_REPLACE_LIVE_FLAGS": "1"}),
    "new-host": (lambda h: None, "v1.34.6+k3s1", CONFIG, {}),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_preflight_and_k3s_install_reach_the_same_verdict(host, scenario):
    prepare, version, config, env = SCENARIOS[scenario]
    prepare(host)
    verdict = checked(host, version, config, **env)
    assert verdict == refusal("k3s-install.sh", host.run(version, config, **env))
    assert (verdict is None) == (scenario in ("live-flags-replaced", "new-host"))
    assert "K10" not in (verdict or "")  # a token's value is never shown, live or planned

"""host-baseline.sh's sshd part with the real sshd from openssh-server: `sshd -t` and `sshd -T` read a
configuration laid out like Ubuntu's (sshd_config including sshd_config.d/*.conf, cloud-init's
50-cloud-init.conf allowing passwords). systemd, apt and timedatectl are stand-ins that record calls."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from infra.bootstrap import HOST_FILES

SCRIPT = HOST_FILES / "host-baseline.sh"
SSHD = Path("/usr/sbin/sshd")

STAND_INS = {
    # A reload fails while $FAKE/reload-fails exists, as when sshd is not running or its unit is masked.
    "systemctl": 'echo "systemctl $*" >>"$FAKE/calls.log"\n[[ $1 != reload || ! -e $FAKE/reload-fails ]]\n',
    "dpkg-query": "echo 'install ok installed'\n",
    "apt-get": 'echo "apt-get $*" >>"$FAKE/calls.log"; exit 1\n',
    "timedatectl": '[[ $1 == show ]] && echo UTC\n',
}


class SshHost:
    def __init__(self, root: Path):
        self.root = root
        self.drop_ins = root / "sshd_config.d"
        self.drop_ins.mkdir()
        self.drop_in = self.drop_ins / "00-katforge.conf"
        self.config = root / "sshd_config"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "ssh_host_ed25519_key")], check=True)
        # Ubuntu 24.04's sshd_config, pointed at this directory.
        self.main = (f"Include {self.drop_ins}/*.conf\n"
                     f"HostKey {root}/ssh_host_ed25519_key\n"
                     "KbdInteractiveAuthentication no\nUsePAM yes\nX11Forwarding yes\nPrintMotd no\n"
                     "AcceptEnv LANG LC_*\nSubsystem sftp /usr/lib/openssh/sftp-server\n")
        self.config.write_text(self.main)
        (self.drop_ins / "50-cloud-init.conf").write_text("PasswordAuthentication yes\n")
        bin_dir = root / "bin"
        bin_dir.mkdir()
        for name, body in STAND_INS.items():
            (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
            (bin_dir / name).chmod(0o755)
        self.log = root / "calls.log"
        self.log.touch()
        self.env = {**os.environ, "PATH": f"{bin_dir}:/usr/sbin:{os.environ['PATH']}", "FAKE": str(root),
                    "SSHD_CONFIG": str(self.config), "SSHD_DROP_IN": str(self.drop_in),
                    "APT_CONF_DIR": str(root / "apt.conf.d"), "KATFORGE_STATE_DIR": str(root / "state")}

    def run(self) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT)], env=self.env, capture_output=True, text=True)

    def effective(self) -> dict[str, str]:
        out = subprocess.run([str(SSHD), "-T", "-f", str(self.config)], capture_output=True, text=True, check=True).stdout
        return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)

    def reloads(self) -> int:
        return self.log.read_text().splitlines().count("systemctl reload ssh")


@pytest.fixture
def ssh(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("sshd -t runs as root")
    if not SSHD.exists():
        pytest.skip("no /usr/sbin/sshd (Debian/Ubuntu: openssh-server)")
    # sshd -t wants its privilege separation directory, which openssh-server's unit creates at boot.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    return SshHost(tmp_path)


def test_password_and_root_logins_are_off_as_sshd_reads_it_and_a_second_run_changes_nothing(ssh):
    assert ssh.effective()["passwordauthentication"] == "yes"  # cloud-init's file, as on a fresh host
    result = ssh.run()
    assert result.returncode == 0, result.stderr
    effective = ssh.effective()
    assert (effective["passwordauthentication"], effective["kbdinteractiveauthentication"],
            effective["permitrootlogin"]) == ("no", "no", "no")
    assert ssh.reloads() == 1
    mtime = ssh.drop_in.stat().st_mtime_ns
    again = ssh.run()
    assert again.returncode == 0, again.stderr
    assert ssh.reloads() == 1 and ssh.drop_in.stat().st_mtime_ns == mtime


def test_a_configuration_sshd_rejects_is_left_alone_and_tried_again_once_fixed(ssh):
    broken = ssh.drop_ins / "60-local.conf"
    broken.write_text("PermitRootLogin sometimes\n")
    result = ssh.run()
    assert result.returncode == 1
    assert "nothing was changed" in result.stderr and "sometimes" in result.stderr
    assert not ssh.drop_in.exists() and ssh.reloads() == 0
    broken.unlink()
    fixed = ssh.run()
    assert fixed.returncode == 0, fixed.stderr
    assert ssh.reloads() == 1 and ssh.effective()["passwordauthentication"] == "no"


def test_a_drop_in_sshd_would_not_apply_is_put_back_and_not_reloaded(ssh):
    # A line before the Include wins over the drop-in: the new file would change nothing sshd does.
    ssh.config.write_text("PasswordAuthentication yes\n" + ssh.main)
    previous = "# An earlier version\nPasswordAuthentication no\n"
    ssh.drop_in.write_text(previous)
    result = ssh.run()
    assert result.returncode == 1
    assert "passwordauthentication is yes" in result.stderr
    assert ssh.drop_in.read_text() == previous and ssh.reloads() == 0
    # The next run tests again rather than finding the file in place.
    again = ssh.run()
    assert again.returncode == 1 and ssh.reloads() == 0


def test_a_reload_that_failed_is_tried_again_by_the_next_run(ssh):
    # The drop-in is installed, the reload fails: sshd still runs with the old settings.
    (ssh.root / "reload-fails").touch()
    failed = ssh.run()
    assert failed.returncode != 0 and ssh.reloads() == 1
    assert ssh.effective()["passwordauthentication"] == "no"  # the files are right; the daemon is not
    # The next run finds the file in place, and still reloads: until one reload succeeds.
    again = ssh.run()
    assert again.returncode != 0 and ssh.reloads() == 2
    (ssh.root / "reload-fails").unlink()
    healed = ssh.run()
    assert healed.returncode == 0, healed.stderr
    assert ssh.reloads() == 3 and "sshd reloaded" in healed.stderr
    settled = ssh.run()
    assert settled.returncode == 0 and ssh.reloads() == 3

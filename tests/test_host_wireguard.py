"""wireguard.sh for real: the real wg, wg-quick and iptables, with wireguard-go for the interface, in a
network namespace this module creates. systemctl is the one stand-in, and it acts: starting and stopping
wg-quick@<interface> run the real `wg-quick up` and `down` on the file, as systemd's unit does, and the
unit's state is its own, apart from the link's (an interface brought up by hand leaves it inactive). What
the tests check comes from the interface itself (`wg show`, `ip addr`)."""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from infra.bootstrap import HOST_FILES
from infra.settings import _LABEL

SCRIPT = HOST_FILES / "wireguard.sh"
TOOLS = ("wg", "wg-quick", "wireguard-go", "ip", "iptables")
ADDRESS = "10.99.0.1/24"
NAT = "172.31.0.0/16 3.19.192.157/32"

SYSTEMCTL = r"""#!/usr/bin/env bash
# systemd's wg-quick@<interface> (Type=oneshot, RemainAfterExit=yes) on $WG_DIR/<interface>.conf, as the
# unit on /etc/wireguard/<interface>.conf. Its state is its own: start runs the real `wg-quick up` and
# the unit is active only if that succeeded, whatever the link; stop runs `wg-quick down` only on an
# active unit, which is inactive afterwards even when that failed. An interface brought up by hand
# leaves the unit inactive, and one taken down by hand leaves it active.
echo "systemctl $*" >>"$FAKE/calls.log"
args=()
for arg; do [[ $arg == --* ]] || args+=("$arg"); done
interface=${args[1]#wg-quick@}
conf=$WG_DIR/$interface.conf
active=$FAKE/unit-active enabled=$FAKE/unit-enabled
start() { [[ -e $active ]] || { wg-quick up "$conf" && touch "$active"; }; }
case ${args[0]} in
  is-active) [[ -e $active ]] ;;
  is-enabled) [[ -e $enabled ]] ;;
  enable) touch "$enabled"; [[ " $* " != *" --now "* ]] || start ;;
  start) start ;;
  stop) [[ ! -e $active ]] || { rm "$active"; wg-quick down "$conf"; } ;;
  *) echo "systemctl stand-in: $* is not supported" >&2; exit 1 ;;
esac
"""


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (Debian: wireguard-tools wireguard-go iproute2 iptables)"
    return None


@pytest.fixture(scope="module")
def netns():
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    name = f"katforge-test-{secrets.token_hex(4)}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        yield name
    finally:
        # wireguard-go processes this module started in the namespace; then the namespace itself.
        for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split():
            os.kill(int(pid), signal.SIGTERM)
        subprocess.run(["ip", "netns", "delete", name], check=True)


def keypair() -> tuple[str, str]:
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True, check=True).stdout.strip()
    return private, public


class VpnHost:
    """A VPN host inside the namespace: its /etc/wireguard, its systemd, and the script's inputs."""

    def __init__(self, netns: str, root: Path):
        self.netns = netns
        self.root = root
        # wireguard-go's control sockets live in /var/run/wireguard, shared by every namespace: a name
        # of its own keeps concurrent test runs apart.
        self.interface = f"wgt{secrets.token_hex(3)}"
        self.dir = root / "wireguard"
        self.dir.mkdir(mode=0o700)
        self.conf = self.dir / f"{self.interface}.conf"
        self.key_file = self.dir / "server.key"
        bin_dir = root / "bin"
        bin_dir.mkdir()
        (bin_dir / "systemctl").write_text(SYSTEMCTL)
        (bin_dir / "systemctl").chmod(0o755)
        self.log = root / "calls.log"
        self.log.touch()
        self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE": str(root),
                    "WG_ADDRESS": ADDRESS, "WG_NAT_CIDRS": NAT, "WG_DIR": str(self.dir),
                    "WG_INTERFACE": self.interface, "WG_SYSCTL_CONF": str(root / "60-katforge-wireguard.conf"),
                    # No kernel module here: wg-quick falls back to wireguard-go.
                    "WG_QUICK_USERSPACE_IMPLEMENTATION": "wireguard-go",
                    "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}

    def inside(self, *args: str, stdin: str | None = None, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.netns, *args], input=stdin, env={**self.env, **env},
                              capture_output=True, text=True, check=check)

    def run(self, peers: list[tuple[str, str, str]], **env: str) -> subprocess.CompletedProcess:
        lines = "".join(f"{name},{public},{address}\n" for name, public, address in peers)
        return self.inside("bash", str(SCRIPT), stdin=lines, check=False, **env)

    def run_traced(self, peers: list[tuple[str, str, str]]) -> tuple[subprocess.CompletedProcess, str]:
        """The script under strace, with the arguments of every program it and its children start. The
        wireguard-go daemon that wg-quick leaves behind would keep strace waiting: once the script is
        done, strace is told to let go (-I1: by default strace blocks SIGTERM while it runs a program)."""
        inputs, trace, status = (self.root / name for name in ("traced.in", "execve.log", "traced.status"))
        status.unlink(missing_ok=True)
        inputs.write_text("".join(f"{name},{public},{address}\n" for name, public, address in peers))
        script = 'bash "$0" <"$1" >"$1.out" 2>"$1.err"; echo $? >"$2"'
        tracer = subprocess.Popen(["ip", "netns", "exec", self.netns, "strace", "-I1", "-f", "-qq", "-e", "trace=execve",
                                   "-s", "4096", "-o", str(trace), "bash", "-c", script, str(SCRIPT),
                                   str(inputs), str(status)], env=self.env)
        try:
            deadline = time.monotonic() + 60
            while not status.exists() or not status.read_text().strip():
                assert time.monotonic() < deadline, "the traced script did not finish"
                time.sleep(0.1)
        finally:
            tracer.terminate()
            tracer.wait()
        result = subprocess.CompletedProcess(["wireguard.sh"], int(status.read_text()),
                                             Path(f"{inputs}.out").read_text(), Path(f"{inputs}.err").read_text())
        return result, trace.read_text()

    def wg(self, what: str) -> str:
        return self.inside("wg", "show", self.interface, what).stdout.strip()

    def peers(self) -> dict[str, str]:
        return dict(line.split("\t") for line in self.wg("allowed-ips").splitlines())

    def addresses(self) -> list[str]:
        out = self.inside("ip", "-o", "-4", "addr", "show", "dev", self.interface).stdout
        return re.findall(r"inet (\S+)", out)

    def ifindex(self) -> str:
        return self.inside("ip", "-o", "link", "show", "dev", self.interface).stdout.split(":")[0]

    def calls(self) -> list[str]:
        return [call for call in self.log.read_text().splitlines() if " is-active " not in call and " is-enabled " not in call]

    def unit_active(self) -> bool:
        return self.inside("systemctl", "is-active", f"wg-quick@{self.interface}", check=False).returncode == 0

    def start_live(self, text: str) -> None:
        """The server as an operator set it up: their file, brought up by systemd."""
        self.conf.write_text(text)
        self.conf.chmod(0o600)
        self.inside("systemctl", "enable", "--now", f"wg-quick@{self.interface}")
        self.log.write_text("")

    def stop(self) -> None:
        if self.inside("ip", "link", "show", "dev", self.interface, check=False).returncode == 0:
            self.inside("wg-quick", "down", str(self.conf), check=False)


@pytest.fixture
def vpn(netns, tmp_path):
    host = VpnHost(netns, tmp_path)
    yield host
    host.stop()


def clients(count: int, first: int = 2) -> list[tuple[str, str, str]]:
    return [(f"client{first + i}", keypair()[1], f"10.99.0.{first + i}/32") for i in range(count)]


def live_conf(private_key: str, peers, address: str = ADDRESS, port: int = 51820, psk: str | None = None) -> str:
    """A wg0.conf as the operators wrote it: the key inline, the usual tutorial NAT, a comment per peer,
    and, given one, a preshared key for the last peer."""
    text = (f"[Interface]\nAddress = {address}\nListenPort = {port}\nPrivateKey = {private_key}\n"
            "PostUp = iptables -A FORWARD -i %i -j ACCEPT; iptables -t nat -A POSTROUTING -o eth0 -j MASQUERADE\n"
            "PostDown = iptables -D FORWARD -i %i -j ACCEPT; iptables -t nat -D POSTROUTING -o eth0 -j MASQUERADE\n")
    for name, public, allowed in peers:
        text += f"\n# {name}\n[Peer]\nPublicKey = {public}\nAllowedIPs = {allowed}\n"
    if psk:
        text += f"PresharedKey = {psk}\n"
    return text


def test_a_new_server_gets_a_key_an_address_and_its_peers(vpn):
    peers = clients(2)
    # What make preflight reads (WG_PRINT_INTERFACE): the [Interface] section the run writes, and nothing done.
    printed = vpn.run(peers, WG_PRINT_INTERFACE="1")
    assert printed.returncode == 0 and list(vpn.dir.iterdir()) == [] and vpn.calls() == []
    refused = vpn.run(peers, WG_PRINT_INTERFACE="yes")  # not a full run by a typo
    assert refused.returncode == 2 and "expected 1" in refused.stderr
    assert list(vpn.dir.iterdir()) == [] and vpn.calls() == []
    result = vpn.run(peers)
    assert result.returncode == 0, result.stderr
    assert vpn.conf.read_text().split("\n\n")[0].split("\n", 1)[1] == printed.stdout.rstrip("\n")
    private = vpn.key_file.read_text().strip()
    assert stat.S_IMODE(vpn.key_file.stat().st_mode) == 0o600
    assert vpn.wg("private-key") == private
    assert result.stdout == vpn.wg("public-key")  # the output is the public key, exactly
    assert vpn.wg("listen-port") == "51820"
    assert vpn.addresses() == [ADDRESS]
    assert vpn.peers() == {public: address for _, public, address in peers}
    assert private not in vpn.conf.read_text() and private not in result.stderr
    assert vpn.inside("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    nat = vpn.inside("iptables", "-t", "nat", "-S", "POSTROUTING").stdout
    assert "-s 10.99.0.0/24 -d 172.31.0.0/16 -j MASQUERADE" in nat


def test_adding_and_removing_peers_keeps_the_key_and_the_tunnel(vpn):
    peers = clients(3)
    assert vpn.run(peers[:2]).returncode == 0
    private, public, index = vpn.wg("private-key"), vpn.wg("public-key"), vpn.ifindex()
    for change in (peers, peers[1:2]):  # one added, then two removed
        vpn.log.write_text("")
        result = vpn.run(change)
        assert result.returncode == 0, result.stderr
        assert "applied without a restart" in result.stderr
        assert vpn.wg("private-key") == private and vpn.wg("public-key") == public == result.stdout
        assert vpn.peers() == {p: address for _, p, address in change}
        assert vpn.ifindex() == index and vpn.calls() == []  # the interface never went down
    backup = vpn.dir / f"{vpn.interface}.conf.bak"
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600 and backup.read_text().count("[Peer]") == 3


def test_a_second_run_changes_nothing(vpn):
    peers = clients(2)
    assert vpn.run(peers).returncode == 0
    before = (vpn.conf.read_bytes(), vpn.conf.stat().st_mtime_ns, vpn.ifindex(), vpn.wg("private-key"))
    vpn.log.write_text("")
    again = vpn.run(peers)
    assert again.returncode == 0, again.stderr
    assert (vpn.conf.read_bytes(), vpn.conf.stat().st_mtime_ns, vpn.ifindex(), vpn.wg("private-key")) == before
    assert vpn.calls() == [] and again.stderr == ""


def test_a_server_that_lost_its_key_gets_it_back(vpn):
    # What the old peer sync left behind: the file and the key are right, the interface has no key.
    peers = clients(1)
    assert vpn.run(peers).returncode == 0
    public = vpn.wg("public-key")
    vpn.inside("wg", "set", vpn.interface, "private-key", "/dev/null")
    assert vpn.wg("private-key") == "(none)"
    healed = vpn.run(peers)
    assert healed.returncode == 0, healed.stderr
    assert vpn.wg("public-key") == public == healed.stdout


def preshared_keys(vpn) -> dict[str, str]:
    return dict(line.split("\t") for line in vpn.wg("preshared-keys").splitlines())


def test_a_rerun_gives_the_running_interface_back_what_it_lost(vpn):
    # The file is unchanged; the interface is not (a peer changed by hand, or a run that failed between
    # installing the file and syncing it). Each loss alone: a rerun heals it without a restart.
    private, public = keypair()
    peers = clients(3)
    psk = subprocess.run(["wg", "genpsk"], capture_output=True, text=True, check=True).stdout.strip()
    vpn.start_live(live_conf(private, peers, psk=psk))
    assert vpn.run(peers).returncode == 0
    index, conf = vpn.ifindex(), vpn.conf.read_bytes()
    for loss in ((peers[0][1], "remove"), (peers[1][1], "allowed-ips", "10.99.0.50/32"),
                 (peers[2][1], "preshared-key", "/dev/null")):
        vpn.inside("wg", "set", vpn.interface, "peer", *loss)
        vpn.log.write_text("")
        healed = vpn.run(peers)
        assert healed.returncode == 0, healed.stderr
        if loss[1] != "preshared-key":  # what differed is named, by key and addresses (never a preshared key)
            assert f"in the file, not running: {loss[0]}" in healed.stderr and psk not in healed.stderr
        assert vpn.peers() == {p: address for _, p, address in peers} and preshared_keys(vpn)[peers[2][1]] == psk
        assert vpn.wg("private-key") == private and healed.stdout == public
        assert vpn.ifindex() == index and vpn.calls() == [] and vpn.conf.read_bytes() == conf  # no restart
    again = vpn.run(peers)
    assert again.returncode == 0 and again.stderr == ""  # and then nothing to do


def test_adopting_the_live_server_keeps_its_key_address_port_and_peers(vpn):
    private, public = keypair()
    peers = clients(2)
    psk = subprocess.run(["wg", "genpsk"], capture_output=True, text=True, check=True).stdout.strip()
    original = live_conf(private, peers, psk=psk)
    vpn.start_live(original)
    result = vpn.run(peers)
    assert result.returncode == 0, result.stderr
    assert vpn.key_file.read_text().strip() == private  # moved out of the file, not regenerated
    assert vpn.wg("private-key") == private and result.stdout == public
    assert vpn.addresses() == [ADDRESS] and vpn.wg("listen-port") == "51820"
    assert vpn.peers() == {p: address for _, p, address in peers}
    assert preshared_keys(vpn) == {peers[0][1]: "(none)", peers[1][1]: psk}  # the client's tunnel still matches
    assert private not in vpn.conf.read_text() and psk not in vpn.conf.read_text()
    kept = vpn.dir / f"{vpn.interface}.conf.pre-katforge"
    assert kept.read_text() == original and stat.S_IMODE(kept.stat().st_mode) == 0o600
    # The operators' NAT rule went with their file's PostDown; ours are in place.
    nat = vpn.inside("iptables", "-t", "nat", "-S", "POSTROUTING").stdout
    assert "-o eth0" not in nat and "-d 172.31.0.0/16 -j MASQUERADE" in nat
    # Later changes of peers, the preshared one's too, are applied without a restart, and keep it.
    index = vpn.ifindex()
    more = [*peers, *clients(1, first=7)]
    for change in (more, [more[0], more[2]], more):  # one added; the preshared one removed, then back
        vpn.log.write_text("")
        changed = vpn.run(change)
        assert changed.returncode == 0, changed.stderr
        assert "applied without a restart" in changed.stderr and vpn.ifindex() == index and vpn.calls() == []
        assert vpn.peers() == {p: address for _, p, address in change}
    assert preshared_keys(vpn)[peers[1][1]] == psk and vpn.wg("private-key") == private
    # So does a restart by systemd, from the file alone.
    vpn.inside("systemctl", "stop", f"wg-quick@{vpn.interface}")
    vpn.inside("systemctl", "start", f"wg-quick@{vpn.interface}")
    assert preshared_keys(vpn)[peers[1][1]] == psk and vpn.wg("private-key") == private


def test_a_live_all_zero_preshared_key_is_no_key_and_reruns_settle(vpn):
    """wg shows an all-zero preshared key as (none): the rerun's comparison must read it so, or every run
    would sync and then fail."""
    private, _ = keypair()
    peers = clients(2)
    vpn.start_live(live_conf(private, peers, psk="A" * 43 + "="))
    assert vpn.run(peers).returncode == 0
    index = vpn.ifindex()
    again = vpn.run(peers)
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert vpn.ifindex() == index


def test_a_live_peer_missing_from_the_configuration_is_refused_with_the_command_to_add_it(vpn):
    private, public = keypair()
    peers = clients(3)
    original = live_conf(private, peers)
    vpn.start_live(original)
    # And one an operator added to the running interface by hand, in no file.
    _, by_hand = keypair()
    vpn.inside("wg", "set", vpn.interface, "peer", by_hand, "allowed-ips", "10.99.0.9/32")
    result = vpn.run(peers[:1])
    assert result.returncode == 1
    assert "nothing was changed" in result.stderr
    listed = re.findall(r"pulumi config set --path 'katforge:wireguardPeers\[(\d+)\]' '([^']*)' --stack prod", result.stderr)
    # The next free indexes, in the order the host lists the peers: its file first, then the interface.
    assert listed == [("1", ",".join(peers[1])), ("2", ",".join(peers[2])), ("3", f"peer3,{by_hand},10.99.0.9/32")]
    assert vpn.conf.read_text() == original and not vpn.key_file.exists()
    assert vpn.wg("public-key") == public and len(vpn.peers()) == 4


@pytest.mark.parametrize("address, port, message", [
    ("10.8.0.1/24", 51820, "the live Address is 10.8.0.1/24"),
    (ADDRESS, 51821, "the live ListenPort is 51821"),
], ids=["address", "port"])
def test_a_live_server_on_another_address_or_port_is_refused(vpn, address, port, message):
    private, public = keypair()
    peers = clients(1)
    original = live_conf(private, peers, address=address, port=port)
    vpn.start_live(original)
    result = vpn.run(peers)
    assert result.returncode == 1
    assert message in result.stderr
    assert vpn.conf.read_text() == original and vpn.addresses() == [address]
    assert vpn.wg("listen-port") == str(port) and vpn.wg("public-key") == public


def test_an_interface_brought_up_by_hand_is_checked_live_and_handed_to_systemd(vpn):
    private, public = keypair()
    peers = clients(2)
    vpn.conf.write_text(live_conf(private, peers))
    vpn.conf.chmod(0o600)
    vpn.inside("wg-quick", "up", str(vpn.conf))  # by an operator: systemd knows nothing of it
    _, by_hand = keypair()
    vpn.inside("wg", "set", vpn.interface, "peer", by_hand, "allowed-ips", "10.99.0.9/32")
    assert not vpn.unit_active()
    refused = vpn.run(peers)
    assert refused.returncode == 1 and "nothing was changed" in refused.stderr
    assert f"'peer2,{by_hand},10.99.0.9/32'" in refused.stderr
    assert [path.name for path in vpn.dir.iterdir()] == [vpn.conf.name]  # no key file, no backup
    assert not Path(vpn.env["WG_SYSCTL_CONF"]).exists()

    # With the peer in the configuration: one restart (the [Interface] hooks are new), under systemd.
    everyone = [*peers, ("hand", by_hand, "10.99.0.9/32")]
    adopted = vpn.run(everyone)
    assert adopted.returncode == 0, adopted.stderr
    assert vpn.unit_active() and vpn.wg("private-key") == private and adopted.stdout == public
    assert vpn.peers() == {p: address for _, p, address in everyone} and vpn.addresses() == [ADDRESS]
    nat = vpn.inside("iptables", "-t", "nat", "-S", "POSTROUTING").stdout
    assert "-o eth0" not in nat  # the hand-started file's PostDown ran: its rules went with it

    # Up by hand again, from our file: a change of peers is applied to the live link, no restart.
    vpn.inside("systemctl", "stop", f"wg-quick@{vpn.interface}")
    vpn.inside("wg-quick", "up", str(vpn.conf))
    index = vpn.ifindex()
    vpn.log.write_text("")
    synced = vpn.run(everyone[1:])
    assert synced.returncode == 0, synced.stderr
    assert "applied without a restart" in synced.stderr and vpn.ifindex() == index and vpn.calls() == []
    assert vpn.peers() == {p: address for _, p, address in everyone[1:]} and vpn.wg("private-key") == private


def test_an_interface_up_from_another_file_is_refused(vpn):
    private, _ = keypair()
    elsewhere = vpn.root / "elsewhere" / vpn.conf.name  # wg-quick names the interface after the file
    elsewhere.parent.mkdir()
    elsewhere.write_text(live_conf(private, clients(1)))
    elsewhere.chmod(0o600)
    vpn.inside("wg-quick", "up", str(elsewhere))
    vpn.key_file.write_text(private + "\n")  # even with its key in place: nothing could take it down
    result = vpn.run(clients(1))
    assert result.returncode == 1 and f"but {vpn.conf} does not exist" in result.stderr
    assert not vpn.conf.exists() and vpn.wg("private-key") == private
    vpn.inside("wg-quick", "down", str(elsewhere))


def test_an_interface_taken_down_by_hand_is_started_again(vpn):
    peers = clients(1)
    assert vpn.run(peers).returncode == 0
    vpn.inside("wg-quick", "down", str(vpn.conf))  # systemd still counts the unit as active
    again = vpn.run(peers)
    assert again.returncode == 0, again.stderr
    assert vpn.unit_active() and vpn.peers() == {peers[0][1]: peers[0][2]} and again.stdout == vpn.wg("public-key")


def test_the_command_for_a_missing_peer_names_it_as_the_configuration_accepts(vpn):
    private, _ = keypair()
    peers = clients(4)
    text = live_conf(private, peers)
    for old, comment in (("client3", "Alice laptop"), ("client4", "  Bob's PC (old) --"), ("client5", "---")):
        text = text.replace(f"# {old}\n", f"# {comment}\n")
    vpn.conf.write_text(text)
    refused = vpn.run(peers[:1])
    listed = re.findall(r"pulumi config set --path 'katforge:wireguardPeers\[\d+\]' '([^,]*),", refused.stderr)
    assert listed == ["alice-laptop", "bob-s-pc-old", "peer3"]
    assert all(_LABEL.match(name) for name in listed)


def test_configuration_keys_are_read_in_any_case_as_wg_quick_does(vpn):
    private, public = keypair()
    peers = clients(2)
    text = live_conf(private, peers).replace("ListenPort = 51820", "ListenPort = 51820  # the default")
    for key in ("[Interface]", "Address", "ListenPort", "PrivateKey", "[Peer]", "PublicKey", "AllowedIPs"):
        text = text.replace(key, key.lower())
    vpn.conf.write_text(text)  # and down, as after a reboot with the unit disabled
    refused = vpn.run(peers[:1])
    assert refused.returncode == 1 and f"live peer {peers[1][1]}" in refused.stderr
    result = vpn.run(peers)
    assert result.returncode == 0, result.stderr
    assert vpn.key_file.read_text().strip() == private and result.stdout == public  # not a new key


def test_forwarding_that_was_turned_off_is_turned_on_again(vpn):
    peers = clients(1)
    assert vpn.run(peers).returncode == 0
    vpn.inside("sysctl", "-q", "-w", "net.ipv4.ip_forward=0")
    again = vpn.run(peers)
    assert again.returncode == 0, again.stderr
    assert vpn.inside("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"


def test_a_new_interface_that_fails_to_start_is_rolled_back_to_the_running_one(vpn):
    private, public = keypair()
    peers = clients(1)
    original = live_conf(private, peers)
    vpn.start_live(original)
    # iptables refuses this destination: wg-quick up fails in the new file's PostUp.
    result = vpn.run(peers, WG_NAT_CIDRS="172.31.0.0/99")
    assert result.returncode != 0
    assert "starting it again with the previous one" in result.stderr
    assert vpn.conf.read_text() == original
    assert vpn.wg("public-key") == public and vpn.peers() == {peers[0][1]: peers[0][2]}


def test_the_private_key_is_on_no_command_line(vpn):
    if shutil.which("strace") is None:
        pytest.skip("strace is missing: cannot watch every program's arguments")
    private, _ = keypair()
    psk = subprocess.run(["wg", "genpsk"], capture_output=True, text=True, check=True).stdout.strip()
    peers = clients(3)
    vpn.start_live(live_conf(private, peers[:2], psk=psk))
    for change, step in ((peers[:2], "started"), (peers, "syncconf")):  # adoption, then a new peer
        result, log = vpn.run_traced(change)
        assert result.returncode == 0, result.stderr
        assert step in (result.stderr if step == "started" else log)
        assert private not in log and psk not in log

"""Before a CI job joins the VPN: is the WireGuard config it was given the one of its own peer?

    printf '%s\n' "$WIREGUARD_CONFIG" | python -m tools.check_vpn_config --peer ci-preview-prod

The config comes on stdin (it holds a private key: never on a command line, never printed). Refused,
each with one line, before `wg-quick up`: an empty config (an environment secret not set reads as
empty, and the job would otherwise fail later, or worse, join as another job's peer); a config without
exactly one [Interface] with PrivateKey and Address, or without a [Peer] with PublicKey and Endpoint;
a DNS line (wg-quick would need resolvconf, and CI needs no VPN DNS); an Address other than the peer's
in katforge:wireguardPeers of Pulumi.prod.yaml; and a private key whose public key (`wg pubkey`) is not
that peer's: two jobs with one key steal each other's tunnel.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

from tools import stackfile

ROOT = Path(__file__).resolve().parent.parent


def sections(text: str) -> list[tuple[str, dict[str, list[str]]]]:
    """wg-quick's INI form: [Interface] and [Peer] sections of `Key = value` lines, `#` comments."""
    found: list[tuple[str, dict[str, list[str]]]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        header = re.fullmatch(r"\[(\w+)\]", line)
        if header:
            found.append((header.group(1), {}))
        elif "=" in line and found:
            key, _, value = line.partition("=")
            found[-1][1].setdefault(key.strip().lower(), []).append(value.strip())
        else:
            raise ValueError("a line outside a section or without '='")
    return found


def peers(root: Path) -> dict[str, tuple[str, str]]:
    """name -> (public key, address) from Pulumi.prod.yaml (the VPN host is prod's)."""
    schema = yaml.safe_load((root / "Pulumi.yaml").read_text())["config"]
    lines = stackfile.read(root / "Pulumi.prod.yaml", schema).get("katforge:wireguardPeers", [])
    return {name: (key, address) for name, key, address in (line.split(",") for line in lines)}


def public_key(private_key: str) -> str:
    result = subprocess.run(["wg", "pubkey"], input=private_key + "\n", capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError("its PrivateKey is not a WireGuard key")
    return result.stdout.strip()


def problem(config: str, peer: str, root: Path = ROOT) -> Optional[str]:
    known = peers(root)
    if peer not in known:
        return (f"peer {peer} is not in katforge:wireguardPeers of Pulumi.prod.yaml: add it (README, \"Adding a VPN "
                "peer\") and commit the file")
    key, address = known[peer]
    if not config.strip():
        return f"the WireGuard config for {peer} is empty: set this environment's secret to its wg-quick config"
    try:
        parts = sections(config)
    except ValueError as error:
        return f"the WireGuard config for {peer} is not a wg-quick config: {error}"
    interfaces = [values for name, values in parts if name == "Interface"]
    remote = [values for name, values in parts if name == "Peer"]
    if len(interfaces) != 1 or not {"privatekey", "address"} <= interfaces[0].keys():
        return f"the WireGuard config for {peer} needs one [Interface] with PrivateKey and Address"
    if not remote or not all({"publickey", "endpoint"} <= values.keys() for values in remote):
        return f"the WireGuard config for {peer} needs a [Peer] with PublicKey and Endpoint (the VPN host)"
    if "dns" in interfaces[0]:
        return f"the WireGuard config for {peer} has a DNS line: remove it (CI resolves public names itself)"
    addresses = [a.strip() for value in interfaces[0]["address"] for a in value.split(",")]
    if addresses != [address]:
        return f"the WireGuard config for {peer} has Address {', '.join(addresses)}, but {peer} is {address}"
    try:
        derived = public_key(interfaces[0]["privatekey"][0])
    except ValueError as error:
        return f"the WireGuard config for {peer}: {error}"
    if derived != key:
        return (f"the WireGuard config for {peer} holds another peer's private key (its public key is {derived}, "
                f"{peer}'s is {key})")
    return None


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.check_vpn_config",
                                     description="Is the wg-quick config on stdin this peer's own?")
    parser.add_argument("--peer", required=True, help="the peer's name in katforge:wireguardPeers")
    args = parser.parse_args(argv)
    found = problem(sys.stdin.read(), args.peer)
    if found:
        print(found, file=sys.stderr)
        return 1
    print(f"WireGuard config of {args.peer}: its address and key")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The hosts half of `make discover`: the read-only scripts infra/host/discover-k3s.sh and
discover-vpn.sh, sent over SSH on stdin with the operator's own OpenSSH client (BatchMode: a key or an
agent, never a prompt) and run as root through `sudo -n`. Their output, one fact a line, becomes JSON
here. The scripts print no secret value; this module adds where each secret lives to `secrets`.
"""
from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from infra.bootstrap import HOST_FILES
from tools.discover_targets import Targets

SCRIPTS = {"k3s": HOST_FILES / "discover-k3s.sh", "vpn": HOST_FILES / "discover-vpn.sh"}
# Read on every host ahead of its own script: the sshd settings host-baseline.sh sets.
SSHD_SCRIPT = HOST_FILES / "discover-sshd.sh"
REDACTED = "[redacted]"
TIMEOUT = 120  # seconds per host: psql and k3s answer in well under that
WG_HOOKS = ("PreUp", "PostUp", "PreDown", "PostDown")  # wg-quick(8)


@dataclass(frozen=True)
class Ssh:
    user: str = "ubuntu"
    key: Optional[str] = None
    port: Optional[int] = None
    options: tuple[str, ...] = ()  # `-o` options, e.g. ProxyJump=... or UserKnownHostsFile=...
    host_env: tuple[tuple[str, str], ...] = ()  # variables for the scripts (their headers list them)
    addresses: dict[str, str] = field(default_factory=dict)  # host role -> address; default from config

    def command(self, address: str) -> list[str]:
        cmd = ["ssh", "-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15", "-l", self.user]
        if self.key:
            cmd += ["-i", self.key, "-o", "IdentitiesOnly=yes"]
        if self.port:
            cmd += ["-p", str(self.port)]
        for option in self.options:
            cmd += ["-o", option]
        env = [f"{name}={value}" for name, value in self.host_env]
        remote = (["sudo", "-n"] if self.user != "root" else []) + (["env", *env] if env else []) + ["bash", "-s"]
        return cmd + ["--", address, shlex.join(remote)]


def run(ssh: Ssh, role: str, address: str) -> tuple[list[list[str]], Optional[str]]:
    """The script's facts as fields per line, or the reason it could not run."""
    try:
        result = subprocess.run(ssh.command(address), input=SSHD_SCRIPT.read_text() + SCRIPTS[role].read_text(),
                                capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return [], f"no answer within {TIMEOUT} s"
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        return [], f"ssh {ssh.user}@{address}: {last}"
    return [line.split("\t") for line in result.stdout.splitlines() if line], None


def _flag(value: str) -> bool:
    return value == "t"


def k3s_facts(lines: list[list[str]], t: Targets, secrets: list[dict]) -> dict:
    # unitFiles: the unit file, then its drop-ins, each with its [Service] settings in order: ["ExecStart",
    # [words]], ["Environment", [name, value]], ["EnvironmentFile", path]; a None value empties the list.
    k3s: dict[str, Any] = {"unitFiles": [], "env": {}, "manifests": []}
    # hbaText: {file: [[line number, text]]}, the rules' lines (a file pg-configure.sh wrote: all of it);
    # fileSettings: where each setting is set, in the server's reading order; foreignOwned: {database:
    # [[kind, name]]} of what postgres owns outside schema public.
    pg: dict[str, Any] = {"roles": {}, "databases": {}, "hba": [], "hbaText": {}, "pendingRestart": {}, "settings": {},
                          "fileSettings": [], "confIncludes": [], "foreignOwned": {}}
    config_lines: list[str] = []
    encryption: list[str] = []
    for kind, *f in lines:
        if kind == "k3s-version":
            k3s["version"] = None if f[0] == "-" else f[0]
        elif kind in ("unit-source", "unit-absent"):
            k3s["unit"] = {"source": f[0], "present": kind == "unit-source"}
        elif kind == "unit-file":
            k3s["unitFiles"].append({"path": f[0], "settings": []})
        elif kind == "unit-exec-start":
            k3s["unitFiles"][-1]["settings"].append(["ExecStart", f[1:]])
        elif kind == "unit-env":
            k3s["unitFiles"][-1]["settings"].append(["Environment", f[1:3]])
        elif kind == "unit-env-file":
            k3s["unitFiles"][-1]["settings"].append(["EnvironmentFile", f[1]])
        elif kind == "unit-env-reset":
            k3s["unitFiles"][-1]["settings"].append(["Environment", None])
        elif kind == "unit-env-file-reset":
            k3s["unitFiles"][-1]["settings"].append(["EnvironmentFile", None])
        elif kind == "env-file":
            k3s["env"][f[0]] = {}
        elif kind == "env":
            k3s["env"][f[0]][f[1]] = f[2]
        elif kind in ("config-file", "config-file-absent"):
            k3s["config"] = {"path": f[0], "present": kind == "config-file"}
        elif kind == "config-line":
            config_lines.append(f[0] if f else "")
        elif kind == "secrets-encrypt":
            encryption.append(f[0])
        elif kind == "secrets-encrypt-error":
            k3s["secretsEncryption"] = {"error": f[0]}
        elif kind == "manifests-dir":
            k3s["manifestsDir"] = f[0]
        elif kind == "manifest":
            k3s["manifests"].append(f[0])
        elif kind in ("postgres-absent", "postgres-error"):
            pg["error"] = f"{kind}: {f[0]}"
        elif kind == "pg-version":
            pg["version"], pg["versionNum"] = f[0], int(f[1])
        elif kind == "pg-setting":
            pg["settings"][f[0]] = f[1]
        elif kind == "pg-role":
            name, superuser, login, createdb, createrole, password, valid_until, quoted = f
            pg["roles"][name] = {"superuser": _flag(superuser), "login": _flag(login), "createdb": _flag(createdb),
                                 "createrole": _flag(createrole), "password": password, "validUntil": valid_until or None,
                                 "quoted": quoted}
        elif kind == "pg-database":
            name, owner, encoding, allow = f
            pg["databases"][name] = {"owner": owner, "encoding": encoding, "allowConnections": _flag(allow)}
        elif kind == "pg-hba":
            line, type_, databases, users, address, netmask, method, options, error, file, rule = f
            pg["hba"].append({"line": int(line), "type": type_, "databases": databases.split(","),
                              "users": users.split(","), "address": address or None, "netmask": netmask or None,
                              "method": method or None, "options": options.split(",") if options else [],
                              "error": error or None, "file": file, "rule": int(rule) if rule else None})
        elif kind == "pg-hba-line":
            pg["hbaText"].setdefault(f[0], []).append([int(f[1]), "\t".join(f[2:])])
        elif kind == "pg-file-setting":
            seqno, name, file, line, applied = f
            pg["fileSettings"].append({"seqno": int(seqno), "name": name, "file": file or None,
                                       "line": int(line) if line else None, "applied": _flag(applied)})
        elif kind == "pg-conf-include":
            pg["confIncludes"].append({"line": int(f[0]), "text": "\t".join(f[1:])})
        elif kind == "pg-foreign-owned":
            pg["foreignOwned"].setdefault(f[0], []).append(f[1:3])
        elif kind == "pg-foreign-owned-error":
            pg.setdefault("foreignOwnedErrors", {})[f[0]] = f[1] if len(f) > 1 else "psql failed"
        elif kind == "pg-pending-restart":
            pg["pendingRestart"][f[0]] = {"running": f[1], "configured": f[2]}
    if k3s.get("config", {}).get("present"):
        # The lines as k3s-install.sh compares them (secrets redacted, comments but its own left out).
        k3s["config"]["lines"] = config_lines
        k3s["config"]["settings"] = yaml.safe_load("\n".join(config_lines)) or {}
    if encryption:
        status = next((line.split(":", 1)[1].strip() for line in encryption if line.startswith("Encryption Status:")), None)
        k3s["secretsEncryption"] = {"status": status, "output": encryption}
    manifests_dir = k3s.get("manifestsDir", "")
    k3s["traefikManifest"] = {"path": f"{manifests_dir}/traefik-config.yaml",
                              "present": "traefik-config.yaml" in k3s["manifests"]}

    where = "k3s host"
    for path, variables in k3s["env"].items():
        for name, value in variables.items():
            if value == REDACTED:
                secrets.append({"where": f"{where}: {path} {name}", "configKey": None})
    for n, unit_file in enumerate(k3s["unitFiles"]):
        unit = "k3s unit" if n == 0 else unit_file["path"]
        for key, value in unit_file["settings"]:
            if key == "Environment" and value and value[1] == REDACTED:
                secrets.append({"where": f"{where}: {unit} Environment {value[0]}", "configKey": None})
            elif key == "ExecStart":
                for i, arg in enumerate(value):
                    if arg == REDACTED or arg.endswith(f"={REDACTED}"):
                        flag = arg.split("=", 1)[0] if arg != REDACTED else value[i - 1]
                        secrets.append({"where": f"{where}: {unit} ExecStart {flag}", "configKey": None})
    for key, value in (k3s.get("config", {}).get("settings") or {}).items():
        if value == REDACTED:
            secrets.append({"where": f"{where}: {k3s['config']['path']} {key}", "configKey": None})
    # The stage's own role, if it exists live, keeps its password: the program sets dbPassword on it.
    role = pg["roles"].get(t.db_role)
    if role and role["password"] != "none":
        secrets.append({"where": f"{where}: PostgreSQL role {t.db_role} ({role['password']} hash)",
                        "configKey": "dbPassword"})
    return {"k3s": k3s, "postgres": pg}


def vpn_facts(lines: list[list[str]], secrets: list[dict]) -> dict:
    wg: dict[str, Any] = {"config": {}, "keyFiles": {}, "running": None}
    sections: dict[int, dict] = {}
    running_peers: dict[str, str] = {}
    for kind, *f in lines:
        if kind == "wg-interface":
            wg["interface"] = f[0]
        elif kind in ("wg-conf", "wg-conf-absent"):
            wg["config"].update(path=f[0], present=kind == "wg-conf")
        elif kind == "wg-conf-header":
            wg["config"]["managed"] = f[0].startswith("# Managed by katforge")
        elif kind == "wg-conf-section":
            sections[int(f[0])] = {"section": f[1], "comment": f[2] if len(f) > 2 else "", "settings": []}
        elif kind == "wg-conf-setting":
            sections.setdefault(int(f[0]), {"section": None, "comment": "", "settings": []})["settings"].append(
                (f[1], f[2] if len(f) > 2 else ""))
        elif kind == "wg-conf-public-key":
            wg["config"]["publicKey"] = f[0]
        elif kind == "wg-key-file":
            wg["keyFiles"][f[0]] = {"publicKey": f[1]}
        elif kind == "wg-running":
            wg["running"] = {"peers": {}}
        elif kind == "wg-running-public-key":
            wg["running"]["publicKey"] = f[0]
        elif kind == "wg-running-listen-port":
            wg["running"]["listenPort"] = int(f[0]) if f[0].isdigit() else None
        elif kind == "wg-running-address":
            wg["running"]["address"] = f[0]
        elif kind == "wg-running-peer":
            running_peers[f[0]] = f[1]
        elif kind == "ip-forward":
            wg["ipForward"] = f[0] == "1"

    # wg and wg-quick read section names and keys in any case.
    interface = next((s for s in sections.values() if (s["section"] or "").lower() == "interface"),
                     {"settings": []})
    settings = {key.lower(): value for key, value in interface["settings"]}
    # wg-quick's hooks, each in the file's order (a key may repeat): what wireguard.sh's may not keep.
    hooks = {hook: [v for k, v in interface["settings"] if k.lower() == hook.lower()] for hook in WG_HOOKS}
    wg["config"].update(address=settings.get("address"),
                        listenPort=int(settings["listenport"]) if settings.get("listenport", "").isdigit() else None,
                        hooks=hooks)
    inline = "privatekey" in settings
    pointed = [v.split("private-key", 1)[1].split()[0] for v in hooks["PostUp"] if "private-key" in v]
    wg["privateKey"] = ({"where": "inline", "path": wg["config"].get("path")} if inline else
                        {"where": "file", "path": pointed[0].replace("%i", wg.get("interface", ""))} if pointed else
                        {"where": "file", "path": sorted(wg["keyFiles"])[0]} if wg["keyFiles"] else {"where": None})
    if wg["privateKey"]["where"]:
        secrets.append({"where": f"vpn host: WireGuard private key, {wg['privateKey']['where']} in "
                                 f"{wg['privateKey']['path']} (stays on the host)", "configKey": None})
    wg["publicKey"] = (wg["running"] or {}).get("publicKey") or wg["config"].get("publicKey") or next(
        (k["publicKey"] for k in wg["keyFiles"].values()), None)

    peers: dict[str, dict] = {}
    for section in sections.values():
        if (section["section"] or "").lower() != "peer":
            continue
        values = {key.lower(): value for key, value in section["settings"]}
        key = values.get("publickey")
        if key:
            peers[key] = {"publicKey": key, "allowedIps": values.get("allowedips", ""),
                          "name": section["comment"] or None, "presharedKey": "presharedkey" in values,
                          "in": ["config"]}
    for key, ips in running_peers.items():
        peer = peers.setdefault(key, {"publicKey": key, "allowedIps": ips, "name": None, "presharedKey": None,
                                      "in": []})
        peer["in"].append("interface")
        peer["runningAllowedIps"] = None if ips == "(none)" else ips
    wg["peers"] = sorted(peers.values(), key=lambda p: p["publicKey"])
    if wg["running"] is not None:
        wg["running"]["peers"] = len(running_peers)
    return {"wireguard": wg}


def sshd_facts(lines: list[list[str]]) -> dict:
    """sshd's settings in effect that host-baseline.sh sets ({"settings": {key: value}}), or {"error": ...}."""
    errors = [f[0] if f else "sshd -T failed" for kind, *f in lines if kind == "sshd-error"]
    if errors:
        return {"error": errors[0]}
    return {"settings": {f[0]: f[1] for kind, *f in lines if kind == "sshd-setting" and len(f) == 2}}


def discover(targets: Targets, ssh: Ssh) -> tuple[dict, list[dict]]:
    secrets: list[dict] = []
    defaults = {"k3s": targets.k3s_public_ip, "vpn": targets.vpn_public_ip}
    hosts: dict[str, Any] = {}
    for role in targets.hosts:
        address = ssh.addresses.get(role) or defaults[role]
        lines, error = run(ssh, role, address)
        if error:
            hosts[role] = {"address": address, "reached": False, "error": error}
            continue
        facts = k3s_facts(lines, targets, secrets) if role == "k3s" else vpn_facts(lines, secrets)
        hosts[role] = {"address": address, "reached": True, "sshd": sshd_facts(lines), **facts}
    if ssh.key and any(h.get("reached") for h in hosts.values()):
        secrets.append({"where": f"operator: the SSH key that reached the hosts, {ssh.key}",
                        "configKey": "sshPrivateKey", "from": ssh.key})
    return hosts, secrets


def key_path(path: Optional[str]) -> Optional[str]:
    return str(Path(path).expanduser()) if path else None

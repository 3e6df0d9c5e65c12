"""What the estate declares for one stage, from the program's own tables: no cluster, no network.

The addresses are the prod stack's config (the hosts and their Elastic IPs belong to prod; qa's records
point at prod's `k3sPrivateIp` output, which is that config value), read as the Pulumi CLI would hand it
to the program (tools.offline.effective_config: Pulumi.yaml's defaults under Pulumi.prod.yaml). So are
its k3s agents (katforge:k3sAgents), each with its own memory budget (infra/capacity.py).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Mapping, Optional, Union

from hearth.kube import EXIT_USAGE, HearthError
from infra import apps as program
from infra import capacity, dns, settings
from infra.settings import REGION, STAGES, AgentSpec, Stage
from tools.offline import effective_config

# Which config key holds the address behind each of infra/dns.py's run-time targets.
ADDRESS_KEYS = {dns.K3S_PUBLIC: "k3sPublicIp", dns.VPN_PUBLIC: "vpnPublicIp", dns.K3S_PRIVATE: "k3sPrivateIp"}
HOSTS_STACK = "prod"  # the stack that owns the hosts, their addresses and the backup bucket


@dataclass(frozen=True)
class Name:
    """A DNS name of the stage and the address it must resolve to (a CNAME's: its target's)."""
    name: str
    type: str
    target: str  # the record's own value as infra/dns.py has it: an address's name, or a CNAME's host
    address: str


@dataclass(frozen=True)
class Estate:
    stage: Stage
    apps: tuple[program.App, ...]
    names: tuple[Name, ...]  # the stage's DNS records
    tls_names: tuple[str, ...]  # the names its routes serve over HTTPS, each with a certificate
    addresses: Mapping[str, str]  # name -> declared address, every record of every stage
    bucket: str
    region: str
    k3s_private_ip: str  # the k3s host's node has it as its InternalIP (k3s's node-ip)
    budget: Union[capacity.Report, capacity.Estate]  # the k3s host's, or each node's with agents

    @property
    def namespace(self) -> str:
        return self.stage.namespace

    @property
    def backup_prefix(self) -> str:
        """Where the stage's dumps are: <stage>/<database>/<UTC timestamp>.dump (infra/host/backup-databases.sh)."""
        return f"{self.stage.name}/{self.stage.database}/"

    def app(self, name: str) -> Optional[program.App]:
        return next((app for app in self.apps if app.name == name), None)

    def declared_replicas(self, app: program.App) -> int:
        """The replicas the program declares for the app: its own Deployment's (infra/apps.py, deployment())."""
        return program.deployment(app, stage=self.stage.name, namespace=self.namespace, image_tag="")["spec"]["replicas"]

    def routes(self, app: program.App) -> list[str]:
        """The app's routes as the table writes them: host and path, a redirect with its target."""
        return [f"{r.host}{r.path if r.path != '/' else ''}" + (f" -> {r.redirect_to}" if r.redirect_to else "")
                for r in app.routes.get(self.stage.name, ())]


def declared_addresses(config: Mapping[str, str]) -> dict[str, str]:
    """Every record's address: an A record's from config, a CNAME's from the record it names."""
    records = {r.name: r for r in dns.RECORDS}

    def address(name: str, seen: tuple[str, ...] = ()) -> str:
        record = records[name]
        if record.type == "CNAME":
            if record.target in seen:
                raise ValueError(f"infra/dns.py: CNAME loop through {record.target}")
            return address(record.target, (*seen, name))
        return config[f"katforge:{ADDRESS_KEYS[record.target]}"]

    return {name: address(name) for name in records}


@functools.lru_cache(maxsize=1)
def _hosts_config() -> dict[str, str]:
    """Read once per process: parsing Pulumi.yaml is a fifth of a second."""
    return effective_config(HOSTS_STACK)[0]


def _hosts(config: Mapping[str, str]) -> tuple[settings.NetworkSettings, tuple[AgentSpec, ...]]:
    """The network and the k3s agents as the program reads and checks them: infra/settings.py's own reader
    over this config, in a context of its own (Pulumi's config and stack name are context variables), so
    nothing is left set for the rest of the process. A refusal is the program's line, exit 2."""
    try:
        return settings.from_config(HOSTS_STACK, config, read=settings.hosts)
    except settings.SettingsError as error:
        raise HearthError(str(error), EXIT_USAGE) from None


def load(stage_name: str, environ: Mapping[str, str] = os.environ) -> Estate:
    config = _hosts_config()
    network, agents = _hosts(config)
    addresses = declared_addresses(config)
    stage = STAGES[stage_name]
    apps = tuple(program.apps_in(stage.name))
    names = tuple(Name(r.name, r.type, r.target, addresses[r.name]) for r in dns.RECORDS if r.stage == stage.name)
    tls = sorted({route.host for app in apps for route in app.routes.get(stage.name, ())})
    # BACKUP_BUCKET as `make restore` takes it; otherwise the prod stack's backupBucket setting.
    bucket = environ.get("BACKUP_BUCKET") or config["katforge:backupBucket"]
    return Estate(stage=stage, apps=apps, names=names, tls_names=tuple(tls), addresses=addresses, bucket=bucket,
                  region=REGION, k3s_private_ip=network.k3s_private_ip, budget=capacity.estate_report(agents))

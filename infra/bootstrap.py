"""Host bootstrap over SSH: the baseline of both hosts, k3s and PostgreSQL 16 on the k3s host,
WireGuard on the VPN host, and each stage's database and login role.

The work is done by the scripts in infra/host/ (each one documents its inputs and does nothing when
the host already matches). This module installs them under /usr/local/lib/katforge/<stage>/ with
`sudo install` from stdin (a copy over SFTP would land as ubuntu, not root) and runs them with
pulumi_command: plain inputs as `sudo env NAME=value`, data and secrets on stdin. Each run's trigger is
a hash of its script and inputs, so `pulumi up` runs a script again only when one of them changed.
`HostBootstrap` belongs to prod; `StageDatabase` runs in both stacks.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple, Optional, Sequence

import pulumi
import pulumi_command as command
import pulumi_kubernetes as k8s
import yaml

from infra.hosts import Host
from infra.settings import AgentSpec, BootstrapSettings, NetworkSettings, Stage, WireguardPeer

HOST_FILES = Path(__file__).resolve().parent / "host"
REMOTE_DIR = "/usr/local/lib/katforge"
SSH_USER = "ubuntu"
K3S_API_HOST = "k3s.katforge.com"
K3S_API_SERVER = f"https://{K3S_API_HOST}:6443"
K3S_KUBECONFIG = "/etc/rancher/k3s/k3s.yaml"


# The k3s host's memory outside the pods. The kubelet reserves these (render_k3s_config), so what it
# allocates to pods is what is left; infra/capacity.py checks the pods fit in that.
SYSTEM_MEMORY_MIB = 384  # kernel, systemd, journald, sshd, snapd and the SSM agent, unattended-upgrades
K3S_MEMORY_MIB = 640  # the k3s server process (API server, controllers, kubelet, kine/SQLite) and containerd
# The k3s agent process (kubelet, kube-proxy, flannel) and containerd on an agent: k3s measured 275 M at the
# 95th percentile (docs.k3s.io, Reference, Resource Profiling, "K3s agent"); the rest is margin.
K3S_AGENT_MEMORY_MIB = 320
POSTGRES_BACKEND_MIB = 2  # what a connection's backend process takes besides its work_mem


def postgres_worst_case_mib(conf: str) -> int:
    """The most PostgreSQL takes under `conf` (host/postgresql-katforge.conf, which itemises it):
    shared buffers, every connection's work_mem and backend, one manual maintenance task, and every
    autovacuum worker's memory."""
    units = {"kB": 1 / 1024, "MB": 1, "GB": 1024, "": 1}
    settings = {name: int(number) * units[unit] for name, number, unit in
                re.findall(r"^\s*(\w+)\s*=\s*(\d+)(kB|MB|GB|)\s*(?:#.*)?$", conf, flags=re.M)}
    return int(settings["shared_buffers"]
               + settings["max_connections"] * (settings["work_mem"] + POSTGRES_BACKEND_MIB)
               + settings["maintenance_work_mem"]
               + settings["autovacuum_max_workers"] * settings["autovacuum_work_mem"])


POSTGRES_MEMORY_MIB = postgres_worst_case_mib((HOST_FILES / "postgresql-katforge.conf").read_text())

# Besides the VPC, who may log in to PostgreSQL with a password: pods (k3s's 10.42.0.0/16 and
# 10.43.0.0/16) and container networks (172.16.0.0/12), as the spec lists them.
POSTGRES_POD_NETWORKS = ("10.0.0.0/8", "172.16.0.0/12")


def ssh_connection(host: pulumi.Input[str], private_key: pulumi.Input[str]) -> command.remote.ConnectionArgs:
    return command.remote.ConnectionArgs(host=host, user=SSH_USER, private_key=private_key)


class KubernetesProviders(NamedTuple):
    """How the program talks to the cluster: `objects` for everything but the apps' Deployments."""
    objects: k8s.Provider
    deployments: k8s.Provider


def kubernetes_providers(kubeconfig: pulumi.Input[str], cluster: pulumi.Input[str],
                         parent: Optional[pulumi.Resource] = None) -> KubernetesProviders:
    """The providers of every cluster resource, built from the k3s kubeconfig (prod's output in qa).

    `cluster` names the cluster (the k3s instance's ID): only a new cluster replaces a provider, and
    with it every object; a rewritten kubeconfig (a renewed certificate) is an update. Secrets change in
    place: replacing one deletes it first, and a pod starting meanwhile fails. An object that already
    exists is never silently taken over: it must be imported (AlreadyExists otherwise), whatever
    PULUMI_K8S_UPSERT_EXISTING_OBJECTS says.

    The Deployments' images belong to the ship pipeline (`kubectl set image`, `kubectl rollout undo`),
    and Pulumi ignores them: an ignored field takes the value Pulumi's state holds, which `refresh:
    always` (Pulumi.yaml) sets to the live one before every update. The Deployments go through a
    client-side-apply provider: its three-way patch (openapi.PatchForResourceUpdate) sets what differs
    between the live object and Pulumi's inputs, so a refreshed image is left as it is, and an adopted
    object never meets a server-side-apply conflict with the fields `kubectl apply` owns.
    pulumi-kubernetes cannot carry an ignored field inside a list over from the live object itself
    (`containers[0].image`: provider/pkg/await/await.go splits the path on "."), so the refresh is
    what keeps the image. Left open: a release shipped between that refresh and the Deployment's
    update is rolled back to the one before it by that update (a ship is seconds; an `up` minutes)."""
    def provider(name: str, **mode) -> k8s.Provider:
        return k8s.Provider(name, kubeconfig=kubeconfig, cluster_identifier=cluster, enable_secret_mutable=True,
                            upsert_existing_objects=False, opts=pulumi.ResourceOptions(parent=parent), **mode)
    return KubernetesProviders(objects=provider("k3s"),
                               deployments=provider("k3s-deployments", enable_server_side_apply=False))


def postgres_client_cidrs(vpc_cidr: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*POSTGRES_POD_NETWORKS, vpc_cidr, *extra)))


def kubelet_args(agent: bool = False) -> list[str]:
    """The memory the kubelet keeps from pods. k3s reserves none by default, so the kubelet would
    allocate the whole host to pods and the scheduler would not know PostgreSQL is there; with these
    the node's allocatable memory is what the budget leaves to pods, and the kubelet caps the pods'
    cgroup at it (kubernetes.io, "Reserve Compute Resources for System Daemons"). k3s's own eviction
    thresholds (disk only) stay as they are. An agent runs no PostgreSQL and the k3s agent only."""
    if agent:
        return [f"system-reserved=memory={SYSTEM_MEMORY_MIB}Mi", f"kube-reserved=memory={K3S_AGENT_MEMORY_MIB}Mi"]
    return [f"system-reserved=memory={SYSTEM_MEMORY_MIB + POSTGRES_MEMORY_MIB}Mi",
            f"kube-reserved=memory={K3S_MEMORY_MIB}Mi"]


def render_k3s_config(*, public_ip: str, private_ip: str, secrets_encryption: bool = True) -> str:
    """/etc/rancher/k3s/config.yaml: the API's certificate names its public name and address, and the
    kubelet reserves the host's memory outside the pods."""
    config = {
        "tls-san": [K3S_API_HOST, public_ip],
        "node-ip": private_ip,
        "node-external-ip": public_ip,
        "write-kubeconfig-mode": "0600",
        **({"secrets-encryption": True} if secrets_encryption else {}),
        "kubelet-arg": kubelet_args(),
    }
    return "# Managed by katforge (infra/bootstrap.py).\n" + yaml.safe_dump(config, sort_keys=False)


# Where an agent keeps its join token (root's, 0600); config.yaml names it, so the token itself is in no
# file of the configuration, no unit and no command line (k3s agent --token-file, K3S_TOKEN_FILE).
AGENT_TOKEN_FILE = "/etc/rancher/k3s/agent-token"
# The token agents join with, as k3s writes it on the server: agent-token when the server has an agent
# token of its own, else node-token, the server's token, which the k3s quick-start hands agents
# (docs.k3s.io, Quick-Start Guide: "The value to use for K3S_TOKEN is stored at
# /var/lib/rancher/k3s/server/node-token on your server node").
READ_JOIN_TOKEN = ("sudo cat /var/lib/rancher/k3s/server/agent-token 2>/dev/null "
                   "|| sudo cat /var/lib/rancher/k3s/server/node-token")


def render_k3s_agent_config(*, name: str, private_ip: str, server_ip: str) -> str:
    """An agent's /etc/rancher/k3s/config.yaml: it joins the server over the private network, under its
    configured name, and its kubelet reserves what the agent's budget keeps from pods."""
    config = {
        "server": f"https://{server_ip}:6443",
        "token-file": AGENT_TOKEN_FILE,
        "node-name": name,
        "node-ip": private_ip,
        "kubelet-arg": kubelet_args(agent=True),
    }
    return "# Managed by katforge (infra/bootstrap.py).\n" + yaml.safe_dump(config, sort_keys=False)


def agent_install_input(token: str, config: str) -> str:
    """k3s-agent-install.sh's stdin: the join token on the first line, then config.yaml."""
    return f"{token.strip()}\n{config}"


def drain_commands(node: str) -> tuple[str, str]:
    """(create, delete) of the command that stands for an agent's node on the k3s host: create waits for
    the node to be Ready; delete moves its pods away (kubectl drain: evictions respect
    PodDisruptionBudgets; DaemonSet pods stay, emptyDir data goes) and deletes the Node, with k3s's
    node password, so the same name can join again."""
    kubectl = "sudo k3s kubectl"
    return (f"{kubectl} wait --for=condition=Ready node/{node} --timeout=600s",
            f"{kubectl} drain {node} --ignore-daemonsets --delete-emptydir-data --timeout=600s "
            f"&& {kubectl} delete node {node} --ignore-not-found")


def kubeconfig_for_api(kubeconfig: str) -> str:
    """k3s's kubeconfig, pointed at the API's public name instead of 127.0.0.1."""
    document = yaml.safe_load(kubeconfig)
    for cluster in document["clusters"]:
        cluster["cluster"]["server"] = K3S_API_SERVER
    return yaml.safe_dump(document, sort_keys=False)


def wireguard_address(client_cidr: str) -> str:
    """The server's tunnel address: the first of the clients' network, with its prefix length."""
    network = ipaddress.IPv4Network(client_cidr)
    return f"{next(network.hosts())}/{network.prefixlen}"


def wireguard_peer_lines(peers: Sequence[WireguardPeer]) -> str:
    return "".join(f"{peer.name},{peer.public_key},{peer.address}\n" for peer in peers)


def run_line(path: str, environment: Mapping[str, str]) -> str:
    """The command line that runs an installed script as root; plain values only, never a secret."""
    assignments = " ".join(f"{name}={shlex.quote(value)}" for name, value in sorted(environment.items()))
    return f"sudo env {assignments} bash {path}" if assignments else f"sudo bash {path}"


def flag(on: bool) -> str:
    """A yes/no input of a host script, as its environment reads it."""
    return "1" if on else "0"


def content_hash(*parts: Optional[str]) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


@dataclass(frozen=True)
class Target:
    """A host to run scripts on: how to reach it, and what identifies the machine (a new instance
    gets every script again)."""
    connection: command.remote.ConnectionArgs
    identity: pulumi.Input[str]


def host_target(public_ip: pulumi.Input[str], instance_id: pulumi.Input[str],
                private_key: pulumi.Input[str]) -> Target:
    return Target(ssh_connection(public_ip, private_key), instance_id)


def agent_target(private_ip: str, instance_id: pulumi.Input[str], jump_host: pulumi.Input[str],
                 private_key: pulumi.Input[str]) -> Target:
    """An agent, at its private address through the k3s host: agents admit SSH from the k3s host only."""
    return Target(command.remote.ConnectionArgs(
        host=private_ip, user=SSH_USER, private_key=private_key,
        proxy=command.remote.ProxyConnectionArgs(host=jump_host, user=SSH_USER, private_key=private_key)),
        instance_id)


# k3s's release download and checks, which the server's and the agents' installers source.
K3S_RELEASE = "k3s-release.sh"


def install_file(parent: pulumi.Resource, name: str, target: Target, path: str, content: pulumi.Input[str], *,
                 mode: str = "0755", after: Sequence[pulumi.Resource] = ()) -> command.remote.Command:
    """Put `content` at `path` on the target as root (a copy over SFTP would land as ubuntu).
    A changed content rewrites the file; a new instance gets it again."""
    return command.remote.Command(
        name, connection=target.connection,
        create=f"sudo install -D -m {mode} /dev/stdin {path}", delete=f"sudo rm -f {path}",
        stdin=content, triggers=[target.identity], add_previous_output_in_env=False,
        # On a replaced host both copies reach the same address: delete the old one first, so its
        # `rm` cannot remove the file the new one just installed.
        opts=pulumi.ResourceOptions(parent=parent, depends_on=list(after), delete_before_replace=True))


def run_script(parent: pulumi.Resource, name: str, target: Target, stage: str, script: str, *,
               environment: Optional[Mapping[str, pulumi.Input[str]]] = None,
               stdin: Optional[pulumi.Input[str]] = None,
               after: Sequence[pulumi.Resource] = (), libraries: Sequence[str] = ()) -> command.remote.Command:
    """Install infra/host/<script>, and the `libraries` of infra/host/ it sources, beside it on the target
    and run it there; returns the run, which runs again when any of their texts changes."""
    text = (HOST_FILES / script).read_text()
    path = f"{REMOTE_DIR}/{stage}/{script}"
    installed = [install_file(parent, f"{name}-script", target, path, text, after=after)]
    texts = [(HOST_FILES / library).read_text() for library in libraries]
    installed += [install_file(parent, f"{name}-{library.removesuffix('.sh')}-script", target,
                               f"{REMOTE_DIR}/{stage}/{library}", library_text, mode="0644", after=after)
                  for library, library_text in zip(libraries, texts)]
    line = pulumi.Output.from_input(dict(environment or {})).apply(lambda values: run_line(path, values))
    return command.remote.Command(
        name, connection=target.connection, create=line, stdin=stdin,
        triggers=[pulumi.Output.all(text, *texts, line, stdin, target.identity)
                  .apply(lambda parts: content_hash(*parts))],
        add_previous_output_in_env=False,
        opts=pulumi.ResourceOptions(parent=parent, depends_on=[*installed, *after]))


class HostBootstrap(pulumi.ComponentResource):
    """Both hosts' baseline, k3s and PostgreSQL on the k3s host, WireGuard on the VPN host (prod)."""

    def __init__(self, name: str, bootstrap: BootstrapSettings, network: NetworkSettings, stage: str,
                 k3s_host: Host, vpn_host: Host, opts: Optional[pulumi.ResourceOptions] = None):
        super().__init__("katforge:bootstrap:HostBootstrap", name, None, opts)
        k3s = self.k3s_target = host_target(k3s_host.public_ip, k3s_host.instance.id, bootstrap.ssh_private_key)
        self.k3s_connection = k3s.connection
        vpn = host_target(vpn_host.public_ip, vpn_host.instance.id, bootstrap.ssh_private_key)

        def run(run_name: str, target: Target, script: str, **kwargs) -> command.remote.Command:
            return run_script(self, f"{name}-{run_name}", target, stage, script, **kwargs)

        k3s_baseline = run("k3s-baseline", k3s, "host-baseline.sh")
        vpn_baseline = run("vpn-baseline", vpn, "host-baseline.sh")

        k3s_config = k3s_host.public_ip.apply(lambda ip: render_k3s_config(
            public_ip=ip, private_ip=network.k3s_private_ip, secrets_encryption=bootstrap.k3s_secrets_encryption))
        k3s_install = self.k3s_install = run("k3s", k3s, "k3s-install.sh", libraries=[K3S_RELEASE],
                          environment={"K3S_VERSION": bootstrap.k3s_version,
                                       "K3S_REPLACE_LIVE_FLAGS": flag(bootstrap.k3s_replace_live_flags),
                                       "K3S_ENCRYPT_EXISTING_SECRETS": flag(bootstrap.k3s_encrypt_existing_secrets)},
                          stdin=k3s_config, after=[k3s_baseline])
        # The operators' Traefik manifest file leaves the manifests directory, with the HelmChartConfig it
        # made, before Pulumi declares any cluster object: until then k3s would apply it over Pulumi's.
        traefik_handover = run("traefik-handover", k3s, "traefik-handover.sh", after=[k3s_install])
        # k3s.yaml holds the cluster's admin credentials: never logged, stored only as a secret. Read after
        # the handover: every Kubernetes object of both stacks goes through the provider built from it.
        read_kubeconfig = command.remote.Command(
            f"{name}-kubeconfig", connection=self.k3s_connection, create=f"sudo cat {K3S_KUBECONFIG}",
            logging=command.remote.Logging.NONE, triggers=[k3s_install.triggers],
            add_previous_output_in_env=False,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[k3s_install, traefik_handover],
                                        additional_secret_outputs=["stdout", "stderr"]))
        self.kubeconfig = pulumi.Output.secret(read_kubeconfig.stdout.apply(kubeconfig_for_api))

        postgres_install = run("postgres-install", k3s, "postgres-install.sh", after=[k3s_baseline])
        self.postgres = run(
            "postgres-config", k3s, "pg-configure.sh",
            environment={"PG_LISTEN_ADDRESSES": f"localhost,{network.k3s_private_ip}",
                         "PG_CLIENT_CIDRS": " ".join(postgres_client_cidrs(network.vpc_cidr,
                                                                           bootstrap.postgres_extra_client_cidrs)),
                         "PG_ALLOW_RESTART": flag(bootstrap.postgres_allow_restart),
                         "PG_DROP_LIVE_HBA_RULES": flag(bootstrap.postgres_drop_live_hba_rules)},
            # After k3s: the two restarts already take one host-wide lock; Pulumi need not race them.
            stdin=(HOST_FILES / "postgresql-katforge.conf").read_text(), after=[postgres_install, k3s_install])

        # Clients reach the VPC and the k3s host's public name (kubectl) as the VPN host itself.
        wireguard = run(
            "wireguard", vpn, "wireguard.sh",
            environment={"WG_ADDRESS": wireguard_address(network.vpn_client_cidr),
                         "WG_PORT": str(network.wireguard_port),
                         "WG_NAT_CIDRS": k3s_host.public_ip.apply(lambda ip: f"{network.vpc_cidr} {ip}/32")},
            stdin=wireguard_peer_lines(bootstrap.wireguard_peers), after=[vpn_baseline])
        self.vpn_public_key = wireguard.stdout

        self.register_outputs({"kubeconfig": self.kubeconfig, "vpn_public_key": self.vpn_public_key})


class AgentBootstrap(pulumi.ComponentResource):
    """The k3s agents (prod, with katforge:k3sAgents): each gets the hosts' baseline and k3s at the server's
    release, joined over the private network with the server's join token; and stands as a node on the
    k3s host, which drains it before its instance goes."""

    def __init__(self, name: str, bootstrap: BootstrapSettings, network: NetworkSettings, stage: str,
                 server: HostBootstrap, k3s_host: Host, agents: Sequence[tuple[AgentSpec, Host]],
                 opts: Optional[pulumi.ResourceOptions] = None):
        super().__init__("katforge:bootstrap:AgentBootstrap", name, None, opts)
        # The join token, read with logging off into a secret output; it reaches each agent on stdin only.
        token = command.remote.Command(
            f"{name}-join-token", connection=server.k3s_connection, create=READ_JOIN_TOKEN,
            logging=command.remote.Logging.NONE, triggers=[server.k3s_install.triggers],
            add_previous_output_in_env=False,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[server.k3s_install],
                                        additional_secret_outputs=["stdout", "stderr"]))
        join_token = pulumi.Output.secret(token.stdout)
        for agent, host in agents:
            target = agent_target(agent.private_ip, host.instance.id, k3s_host.public_ip, bootstrap.ssh_private_key)
            baseline = run_script(self, f"{name}-{agent.name}-baseline", target, stage, "host-baseline.sh")
            config = render_k3s_agent_config(name=agent.name, private_ip=agent.private_ip,
                                             server_ip=network.k3s_private_ip)
            install = run_script(
                self, f"{name}-{agent.name}-k3s", target, stage, "k3s-agent-install.sh", libraries=[K3S_RELEASE],
                environment={"K3S_VERSION": bootstrap.k3s_version},
                stdin=join_token.apply(lambda value, config=config: agent_install_input(value, config)),
                after=[baseline])
            # Depends on the instance and its k3s: Pulumi deletes it, draining the node, before either goes.
            # A new instance under the same name is a new node: the old one is drained and deleted first,
            # since k3s refuses a second node of one name (its node password).
            create, delete = drain_commands(agent.name)
            command.remote.Command(
                f"{name}-{agent.name}-node", connection=server.k3s_connection, create=create, delete=delete,
                triggers=[host.instance.id], add_previous_output_in_env=False,
                opts=pulumi.ResourceOptions(parent=self, depends_on=[install, host.instance],
                                            delete_before_replace=True))
        self.register_outputs({"agents": [agent.name for agent, _ in agents]})


class StageDatabase(pulumi.ComponentResource):
    """A stage's login role and database on the k3s host's PostgreSQL (both stacks)."""

    def __init__(self, name: str, stage: Stage, password: pulumi.Input[str], target: Target,
                 postgres_ready: Optional[pulumi.Resource] = None, opts: Optional[pulumi.ResourceOptions] = None):
        super().__init__("katforge:bootstrap:StageDatabase", name, None, opts)
        self.database = run_script(
            self, f"{name}-role", target, stage.name, "pg-database.sh",
            environment={"PG_ROLE": stage.db_role, "PG_DATABASE": stage.database},
            stdin=pulumi.Output.secret(password), after=[postgres_ready] if postgres_ready else [])
        self.register_outputs({"database": stage.database, "role": stage.db_role})

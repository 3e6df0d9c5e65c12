"""k3s agents (katforge:k3sAgents): the plans for 0, 1 and 2 agents, the security group matrix, the join
token, the version and the private network they join over, the drain before an agent goes, that pods on
an agent still reach PostgreSQL, Traefik's pinning, the settings' refusals, and k3s-agent-install.sh run
against stand-ins that act rather than decide."""
from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import stat
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

import tools.offline as offline
from infra import capacity, traefik_values
from infra.bootstrap import HOST_FILES, K3S_AGENT_MEMORY_MIB, SYSTEM_MEMORY_MIB, kubelet_args
from infra.settings import SettingsError
from tests import scaled
from tests.test_bootstrap import command_line
from tests.test_traefik_values import ARGS, chart, helm_merge  # noqa: F401 (chart is a fixture)
from tools.offline import evaluate, redact, unwrap
from tools.plan import capacity_section
from tools.plan_diff import diff_plans

COMMAND = "command:remote:Command"
INSTANCE = "aws:ec2/instance:Instance"
GROUP = "aws:ec2/securityGroup:SecurityGroup"
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
SERVER_IP, PUBLIC_IP = "172.31.14.98", "198.51.100.166"
AGENT_IPS = {"agent-1": "172.31.14.120", "agent-2": "172.31.20.40"}


def ingress(plan) -> set[tuple[str, str, int, str]]:
    """(group, protocol, port, source) of every ingress rule; a source group by its name."""
    groups = {r.urn: r.name for r in plan.of_type(GROUP)}
    rules = set()
    for rule in plan.of_type(INGRESS):
        source = rule.options["property_dependencies"].get("referencedSecurityGroupId")
        rules.add((groups[rule.parent], rule.inputs["ipProtocol"], rule.inputs["fromPort"],
                   groups[source[0]] if source else rule.inputs["cidrIpv4"]))
    return rules


def agent_runs(plan, agent: str) -> dict[str, object]:
    return {r.name.removeprefix(f"agents-{agent}-"): r for r in plan.of_type(COMMAND)
            if r.name.startswith(f"agents-{agent}-")}


@pytest.mark.parametrize("count", [0, 1, 2])
def test_each_agent_is_one_instance_with_its_bootstrap_and_its_node(prod, count):
    plan = scaled.agents(count) if count else prod
    names = sorted(AGENT_IPS)[:count]
    assert sorted(r.name for r in plan.of_type(INSTANCE)) == sorted(["k3s", "vpn", *names])
    for name in names:
        assert sorted(agent_runs(plan, name)) == ["baseline", "baseline-script", "k3s", "k3s-k3s-release-script", "k3s-script",
                                                   "node"]
    assert len([r for r in plan.of_type(COMMAND) if r.name == "agents-join-token"]) == (1 if count else 0)
    assert len([r for r in plan.of_type(GROUP) if r.name == "k3s-agents"]) == (1 if count else 0)
    assert len([r for r in plan.resources if r.type == "katforge:bootstrap:AgentBootstrap"]) == (1 if count else 0)


@pytest.mark.parametrize("count", [1, 2])
def test_an_agent_is_a_hardened_stateless_instance_in_the_default_subnet_of_its_address(count):
    plan = scaled.agents(count)
    group = plan.named("k3s-agents", GROUP)
    for name in sorted(AGENT_IPS)[:count]:
        agent = plan.named(name, INSTANCE)
        i = agent.inputs
        assert i["privateIp"] == AGENT_IPS[name]
        subnet = {"172.31.14.120": "subnet-0a1b2c3d4e5f60001", "172.31.20.40": "subnet-0a1b2c3d4e5f60002"}
        assert i["subnetId"] == subnet[AGENT_IPS[name]]
        assert i["metadataOptions"] == {"httpEndpoint": "enabled", "httpTokens": "required",
                                        "httpPutResponseHopLimit": 1}
        assert i["rootBlockDevice"]["encrypted"] is True and i["rootBlockDevice"]["deleteOnTermination"] is True
        assert i["tags"]["Role"] == "k3s-agent" and i["associatePublicIpAddress"] is True
        assert i["disableApiTermination"] is False and "iamInstanceProfile" not in i
        # Only the agents' group: nothing of the k3s host's (the internet's 80 and 443, SSH from operators).
        assert agent.options["property_dependencies"]["vpcSecurityGroupIds"] == [group.urn]
        assert not agent.options["protect"] and agent.options["delete_before_replace"]
        assert agent.options["ignore_changes"] == ["ami", "keyName", "userData"]


def test_the_security_groups_admit_node_to_node_traffic_only(prod):
    """k3s's inbound rules for flannel's VXLAN backend: 8472/udp and 10250/tcp between all nodes, 6443 from
    the agents to the server; SSH to an agent from the k3s host alone. Nothing else, nothing from outside."""
    default = ingress(prod)
    two = ingress(scaled.agents(2))
    nodes = {("k3s-agents", "udp", 8472, "k3s"), ("k3s-agents", "udp", 8472, "k3s-agents"),
             ("k3s-agents", "tcp", 10250, "k3s"), ("k3s-agents", "tcp", 10250, "k3s-agents"),
             ("k3s-agents", "tcp", 22, "k3s"),
             ("k3s", "udp", 8472, "k3s-agents"), ("k3s", "tcp", 10250, "k3s-agents"), ("k3s", "tcp", 6443, "k3s-agents")}
    assert two == default | nodes
    assert ingress(scaled.agents(1)) == two  # one group for every agent: the rules do not grow with them
    # The agents reach PostgreSQL through the rule the VPC already has (their addresses are in it).
    assert ("k3s", "tcp", 5432, "172.31.0.0/16") in default
    egress = [r for r in scaled.agents(2).of_type("aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule")
              if r.name == "k3s-agents-egress"]
    assert len(egress) == 1  # images and packages: the agents reach the internet


def test_the_join_token_is_never_plain():
    """Read with logging off into a secret output; on the agents' stdin only, secret; in no command line,
    no plain input, no output."""
    plan = scaled.agents(2)
    token = offline.K3S_JOIN_TOKEN
    read = plan.named("agents-join-token", COMMAND)
    assert read.inputs["logging"] == "none"
    assert {"stderr", "stdout"} <= set(read.options["additional_secret_outputs"])
    assert "token" in read.inputs["create"] and token not in read.inputs["create"]
    for resource in plan.resources:
        assert token not in json.dumps(redact(resource.raw_inputs)), resource.name  # only inside secrets
        for field in ("create", "update", "delete"):
            assert token not in str(resource.raw_inputs.get(field, "")), resource.name
    for agent in AGENT_IPS:
        install = agent_runs(plan, agent)["k3s"]
        assert install.inputs["stdin"] == "[secret]"
        assert unwrap(install.raw_inputs["stdin"]).splitlines()[0] == token
    assert token not in json.dumps(plan.raw_outputs) and token not in plan.to_json()


def test_agents_join_the_servers_private_address_at_its_release_through_the_k3s_host():
    plan = scaled.agents(2)
    server_line = plan.named("bootstrap-k3s", COMMAND).inputs["create"]
    for agent, ip in AGENT_IPS.items():
        runs = agent_runs(plan, agent)
        config = yaml.safe_load(unwrap(runs["k3s"].raw_inputs["stdin"]).split("\n", 1)[1])
        assert config == {"server": f"https://{SERVER_IP}:6443", "token-file": "/etc/rancher/k3s/agent-token",
                          "node-name": agent, "node-ip": ip, "kubelet-arg": kubelet_args(agent=True)}
        assert "k3s-agent-install.sh" in runs["k3s"].inputs["create"]
        version = [w for w in runs["k3s"].inputs["create"].split() if w.startswith("K3S_VERSION=")]
        assert version and version[0] in server_line.split()  # the server's release, pinned by one setting
        assert "host-baseline.sh" in runs["baseline"].inputs["create"]  # the hosts' hardening
        for run in (runs["baseline"], runs["k3s"]):
            connection = unwrap(run.raw_inputs["connection"])
            assert connection["host"] == ip and connection["user"] == "ubuntu"
            assert connection["proxy"]["host"] == PUBLIC_IP  # through the k3s host, the agents' only SSH source
        assert runs["baseline"].urn in runs["k3s-script"].options["depends_on"]
    assert kubelet_args(agent=True) == [f"system-reserved=memory={SYSTEM_MEMORY_MIB}Mi",
                                        f"kube-reserved=memory={K3S_AGENT_MEMORY_MIB}Mi"]


def test_removing_an_agent_drains_it_before_its_instance_goes():
    plan = scaled.agents(2)
    node = agent_runs(plan, "agent-2")["node"]
    assert node.inputs["delete"] == ("sudo k3s kubectl drain agent-2 --ignore-daemonsets --delete-emptydir-data "
                                     "--timeout=600s && sudo k3s kubectl delete node agent-2 --ignore-not-found")
    assert node.inputs["create"] == "sudo k3s kubectl wait --for=condition=Ready node/agent-2 --timeout=600s"
    assert unwrap(node.raw_inputs["connection"])["host"] == PUBLIC_IP  # on the k3s host
    # Pulumi deletes a resource before those it depends on: the drain before the agent's k3s and instance.
    assert {plan.named("agent-2", INSTANCE).urn, agent_runs(plan, "agent-2")["k3s"].urn} <= set(node.options["depends_on"])
    assert node.options["delete_before_replace"]
    # Taking agent-2's line out deletes exactly agent-2, and changes nothing else.
    diff = diff_plans(json.loads(plan.to_json()), json.loads(scaled.agents(1).to_json()))
    assert {s.op for s in diff.steps} == {"delete"}
    assert {s.resource["name"] for s in diff.steps} == {"agent-2", *(f"agents-agent-2-{n}" for n in (
        "baseline", "baseline-script", "k3s", "k3s-k3s-release-script", "k3s-script", "node"))}


def test_pods_on_an_agent_reach_postgresql_at_the_servers_private_address(prod):
    """Agents change no cluster object: the apps' policies still allow 172.31.14.98:5432, which a pod on an
    agent reaches from the agent's address (flannel masquerades what leaves the pod network); pg_hba admits
    the VPC, and so does the k3s host's security group."""
    plan = scaled.agents(2)

    def kube(p):  # Traefik's values may pin it to the host, and nothing else (below)
        return {r.urn: r.inputs for r in p.resources if r.type.startswith("kubernetes:")
                and r.name != "cluster-traefik-config"}

    assert kube(plan) == kube(prod)
    pinned, default = (yaml.safe_load(p.named("cluster-traefik-config").inputs["spec"]["valuesContent"])
                       for p in (plan, prod))
    assert {k: v for k, v in pinned.items() if k != "nodeSelector"} == default
    for policy in plan.of_type("kubernetes:networking.k8s.io/v1:NetworkPolicy"):
        for rule in policy.inputs["spec"].get("egress", []):
            if {"protocol": "TCP", "port": 5432} in rule.get("ports", []):
                assert rule["to"] == [{"ipBlock": {"cidr": f"{SERVER_IP}/32"}}]
    clients = command_line(plan.named("bootstrap-postgres-config", COMMAND))["PG_CLIENT_CIDRS"].split()
    assert all(any(ipaddress.IPv4Address(ip) in ipaddress.IPv4Network(c) for c in clients) for ip in AGENT_IPS.values())
    assert all(ipaddress.IPv4Address(ip) in ipaddress.IPv4Network("172.31.0.0/16") for ip in AGENT_IPS.values())


def test_traefik_pinned_to_the_server_is_still_what_the_chart_accepts(chart):  # noqa: F811
    defaults, schema = chart
    values = traefik_values.values(**ARGS, on_server_only=True)
    assert values["nodeSelector"] == {"node-role.kubernetes.io/control-plane": "true"}
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(helm_merge(defaults, values)))
    assert not errors, errors
    assert "nodeSelector" not in traefik_values.values(**ARGS)  # without agents, the values stay as they are


def test_with_agents_traefik_and_its_volume_stay_on_the_server():
    config = scaled.agents(1).named("cluster-traefik-config")
    assert yaml.safe_load(config.inputs["spec"]["valuesContent"])["nodeSelector"] == \
        traefik_values.SERVER_NODE_SELECTOR


def test_the_preview_logs_where_each_app_pod_lands_as_make_plan_prints_it_and_only_with_agents(caplog):
    caplog.set_level(logging.INFO)
    evaluate("prod", {"katforge:k3sAgents": list(scaled.TWO_AGENTS)})
    with_agents = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    caplog.clear()
    evaluate("prod")
    alone = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    printed = capacity_section(scaled.agents(2))
    where = printed[printed.index("Where each app pod's worst case (its limit) lands:"):]
    assert with_agents == ["\n".join(where)]
    assert len(where) == 1 + len(capacity.app_pods())  # a line per app pod and the surge, each naming a node
    assert {line.rsplit(": ", 1)[1] for line in where[1:]} <= {"k3s", "agent-1", "agent-2"}
    assert alone == []  # the k3s host alone: the preview says no more than it did


@pytest.mark.parametrize("line, problem", [
    ("agent-1,t3.medium", "has 2 comma-separated parts, not 3"),
    ("Agent_1,t3.medium,172.31.14.120", "the name 'Agent_1' is not a lowercase label"),
    ("k3s,t3.medium,172.31.14.120", "k3s (the server) already has this name"),
    ("agent-1,t4g.medium,172.31.14.120", "the instance type 't4g.medium' has no memory figure in MEMTOTAL_MIB"),
    ("agent-1,t3.medium,10.0.0.5", "the private address is not an address inside the VPC 172.31.0.0/16"),
    ("agent-1,t3.medium,172.31.16.1", "AWS lets an instance have in subnet 172.31.16.0/20, but it reserves"),
    ("agent-1,t3.medium,172.31.14.98", "k3s (the server) already has this address"),
    ("agent-1,t3.medium,172.31.14.9x", "'172.31.14.9x' is not an IPv4 address"),
])
def test_an_agent_line_is_refused_naming_the_part_that_is_wrong(line, problem):
    with pytest.raises(SettingsError) as info:
        evaluate("prod", {"katforge:k3sAgents": [line]})
    message = str(info.value)
    assert message.startswith(f"Pulumi.prod.yaml: katforge:k3sAgents = {line}: expected \"name,instanceType,")
    assert problem in message and "\n" not in message


def test_two_agents_may_not_share_a_name_or_an_address():
    for second in ("agent-1,t3.small,172.31.14.121", "agent-2,t3.small,172.31.14.120"):
        with pytest.raises(SettingsError, match="agent-1 already has this"):
            evaluate("prod", {"katforge:k3sAgents": [scaled.ONE_AGENT[0], second]})


# --- k3s-agent-install.sh -------------------------------------------------------------------------

VERSION = "v1.34.6+k3s1"
TOKEN = "K10" + "ab" * 32 + "::server:agent-join-secret"
CONFIG = ("server: https://172.31.14.98:6443\ntoken-file: {root}/etc/rancher/k3s/agent-token\nnode-name: agent-1\n"
          "node-ip: 172.31.14.120\n")

# k3s as far as the script asks it: its version, and `k3s agent`, which records how it was started and,
# given a token file, joins (its kubelet answers /healthz).
FAKE_K3S = r"""#!/usr/bin/env bash
case $1 in
  --version) echo "k3s version @VERSION@ (0123abcd)" ;;
  agent)
    shift
    { echo "args=$*"; env; } >"$FAKE/state/started"
    token_file=$(sed -n 's/^token-file: *//p' "${K3S_CONFIG_FILE:-$FAKE/etc/rancher/k3s/config.yaml}")
    [[ -e $FAKE/state/never-joins || ! -s $token_file ]] || touch "$FAKE/state/healthy" ;;
esac
"""
# Release files by URL, and the kubelet's /healthz.
CURL = r"""#!/usr/bin/env bash
echo "curl $*" >>"$FAKE/calls.log"
out=""
while [[ $# -gt 0 ]]; do
  case $1 in -o) out=$2; shift 2 ;; --retry|--max-time) shift 2 ;; -*) shift ;; *) url=$1; shift ;; esac
done
if [[ $url == http://127.0.0.1:10248/healthz ]]; then [[ -e $FAKE/state/healthy ]] && echo ok; exit $(( $? ? 7 : 0 )); fi
path=${url#https://github.com/k3s-io/k3s/releases/download/}
path=${path//%2B/+}
[[ $path != "$url" && -f $FAKE/releases/$path ]] || exit 22
cp "$FAKE/releases/$path" "$out"
"""
# systemd for k3s-agent.service: starts the unit it last loaded, with none of the caller's environment.
SYSTEMCTL = r"""#!/usr/bin/env bash
echo "systemctl $*" >>"$FAKE/calls.log"
case $1 in
  daemon-reload) cp "$K3S_SYSTEMD_DIR/k3s-agent.service" "$FAKE/state/loaded.service" ;;
  is-enabled) [[ -e $FAKE/state/enabled ]] ;;
  enable) touch "$FAKE/state/enabled" ;;
  restart)
    rm -f "$FAKE/state/healthy" "$FAKE/state/started"
    exec_start=$(sed -n 's/^ExecStart=//p' "$FAKE/state/loaded.service")
    env -i PATH="$PATH" FAKE="$FAKE" K3S_CONFIG_FILE="$K3S_CONFIG_FILE" bash -c "$exec_start" ;;
  *) exit 1 ;;
esac
"""


class AgentHost:
    def __init__(self, root: Path):
        self.root, self.bin, self.state = root, root / "usr/local/bin", root / "state"
        self.config = root / "etc/rancher/k3s/config.yaml"
        self.token_file = root / "etc/rancher/k3s/agent-token"
        tools = root / "tools"
        for d in (self.bin, self.state, tools, root / "etc/systemd/system"):
            d.mkdir(parents=True)
        for name, text in (("curl", CURL), ("systemctl", SYSTEMCTL)):
            (tools / name).write_text(text)
            (tools / name).chmod(0o755)
        (root / "calls.log").touch()
        self.release(VERSION)
        self.env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "FAKE": str(root),
                    "K3S_BIN_DIR": str(self.bin), "K3S_SYSTEMD_DIR": str(root / "etc/systemd/system"),
                    "K3S_CONFIG_FILE": str(self.config), "K3S_READY_TIMEOUT": "2",
                    "KATFORGE_STATE_DIR": str(root / "katforge")}

    def release(self, version: str, tampered: bool = False) -> None:
        directory = self.root / "releases" / version
        directory.mkdir(parents=True, exist_ok=True)
        binary = FAKE_K3S.replace("@VERSION@", version)
        (directory / "k3s").write_text(binary + ("# tampered\n" if tampered else ""))
        (directory / "sha256sum-amd64.txt").write_text(f"{hashlib.sha256(binary.encode()).hexdigest()}  k3s\n")

    def run(self, token: str = TOKEN, version: str = VERSION, **env: str) -> subprocess.CompletedProcess:
        stdin = f"{token}\n{CONFIG.format(root=self.root)}"
        return subprocess.run(["bash", str(HOST_FILES / "k3s-agent-install.sh")], input=stdin, capture_output=True,
                              text=True, env={**self.env, "K3S_VERSION": version, **env})

    def calls(self, clear: bool = True) -> list[str]:
        log = self.root / "calls.log"
        calls = [c for c in log.read_text().splitlines() if " is-enabled" not in c and "healthz" not in c]
        if clear:
            log.write_text("")
        return calls


@pytest.fixture
def agent_host(tmp_path):
    return AgentHost(tmp_path)


def test_a_new_agent_gets_the_checked_release_and_joins_with_its_token_in_a_root_only_file(agent_host):
    result = agent_host.run()
    assert result.returncode == 0, result.stderr
    agent_host.calls()
    unit = (agent_host.root / "etc/systemd/system/k3s-agent.service").read_text()
    assert f"ExecStart={agent_host.bin}/k3s agent\n" in unit
    assert agent_host.token_file.read_text() == TOKEN + "\n"
    assert stat.S_IMODE(agent_host.token_file.stat().st_mode) == 0o600
    assert agent_host.config.read_text() == CONFIG.format(root=agent_host.root)
    started = (agent_host.state / "started").read_text()
    # `k3s agent` with no argument; the token in neither its command line nor its environment.
    assert started.startswith("args=\n") and TOKEN not in started and "agent-join-secret" not in started
    assert TOKEN not in result.stderr + result.stdout
    assert "k3s agent v1.34.6+k3s1 ready" in result.stderr

    again = agent_host.run()
    assert again.returncode == 0 and "already runs" in again.stderr and agent_host.calls() == []
    # A new token (the server's rotated) is written and the agent restarts, nothing else.
    rotated = agent_host.run(token=TOKEN.replace("secret", "rotated"))
    assert rotated.returncode == 0, rotated.stderr
    assert agent_host.calls() == ["systemctl restart k3s-agent"]
    assert "rotated" in agent_host.token_file.read_text()


def test_a_first_install_downloads_the_release_checks_it_and_starts_the_unit(agent_host):
    assert agent_host.run().returncode == 0
    tag = VERSION.replace("+", "%2B")
    release = f"https://github.com/k3s-io/k3s/releases/download/{tag}"
    calls = agent_host.calls()
    assert [c.split()[-1] for c in calls if c.startswith("curl")] == [f"{release}/sha256sum-amd64.txt",
                                                                       f"{release}/k3s"]
    assert [c for c in calls if not c.startswith("curl")] == [
        "systemctl daemon-reload", "systemctl enable --quiet k3s-agent", "systemctl restart k3s-agent"]


def test_a_binary_that_does_not_match_the_release_checksum_is_not_installed(agent_host):
    agent_host.release(VERSION, tampered=True)
    result = agent_host.run()
    assert result.returncode == 1 and "sha256sum-amd64.txt says" in result.stderr
    assert not (agent_host.bin / "k3s").exists() and not agent_host.token_file.exists()


def test_an_agent_that_does_not_join_fails_and_is_restarted_by_the_next_run(agent_host):
    (agent_host.state / "never-joins").touch()
    failed = agent_host.run()
    assert failed.returncode == 1 and "does not answer /healthz" in failed.stderr
    (agent_host.state / "never-joins").unlink()
    agent_host.calls()
    rerun = agent_host.run()
    assert rerun.returncode == 0, rerun.stderr
    # The files match; the restart (and the reading of the unit it was for) was owed.
    assert agent_host.calls() == ["systemctl daemon-reload", "systemctl restart k3s-agent"]
    settled = agent_host.run()
    assert "already runs" in settled.stderr and agent_host.calls() == []


def test_an_agent_without_its_token_or_token_file_changes_nothing(agent_host):
    assert agent_host.run(token="").returncode == 2
    no_file = subprocess.run(["bash", str(HOST_FILES / "k3s-agent-install.sh")], input=f"{TOKEN}\nserver: x\n",
                             capture_output=True, text=True, env={**agent_host.env, "K3S_VERSION": VERSION})
    assert no_file.returncode == 2 and "names no token-file" in no_file.stderr
    assert agent_host.calls() == [] and not agent_host.token_file.exists()

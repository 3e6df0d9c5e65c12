"""The scaled estate's offline plans (k3s agents, the databases on RDS), each evaluated once per test
process and shared by the tests that only read them: an evaluation costs about a second."""
from __future__ import annotations

from functools import lru_cache

from tools.diagram import SCALED
from tools.offline import Plan, SecretValue, evaluate

ONE_AGENT = ("agent-1,t3.medium,172.31.14.120",)
# The second in another default subnet (172.31.16.0/20) and of another type.
TWO_AGENTS = (*ONE_AGENT, "agent-2,t3.large,172.31.20.40")
RDS_MASTER_PASSWORD = "offline-rds-master-password-0123"
RDS = {"katforge:database": "rds", "katforge:rdsMasterPassword": SecretValue(RDS_MASTER_PASSWORD)}


@lru_cache(maxsize=None)
def agents(count: int) -> Plan:
    """prod with 1 or 2 agents, the database on the host."""
    return evaluate("prod", {"katforge:k3sAgents": list((ONE_AGENT, TWO_AGENTS)[count - 1])})


@lru_cache(maxsize=None)
def rds() -> Plan:
    """prod with its database on RDS, no agents."""
    return evaluate("prod", RDS)


@lru_cache(maxsize=None)
def scaled(stack: str) -> Plan:
    """The scaled estate the second diagram shows (tools/diagram.py SCALED): one agent, both stages on RDS."""
    return evaluate(stack, SCALED[stack], prod_config=SCALED["prod"] if stack != "prod" else None)

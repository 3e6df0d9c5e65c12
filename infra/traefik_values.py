"""Values for the Traefik chart that k3s bundles, handed over by HelmChartConfig kube-system/traefik.

Pure: no Pulumi here, so the values can be rendered and checked against the chart's own
values.schema.json in tests. The layout is the chart's 39+ one (TLS under
`ports.websecure.http.tls`, redirections under `ports.web.http.redirections`).
"""
from __future__ import annotations

import yaml

NAMESPACE = "kube-system"
RELEASE = "traefik"  # the HelmChart k3s installs; a HelmChartConfig of the same name merges into it

# Let's Encrypt through the Route53 DNS challenge: works for names that resolve only inside the
# VPN (qa.*), since nothing has to reach Traefik from the internet.
DNS_RESOLVER = "letsencrypt"
# AWS_HOSTED_ZONE_ID pins the DNS challenge to the katforge.com zone, so names in other zones
# (stumper.gg) get their certificate through TLS-ALPN-01 on 443 instead; they are public anyway.
TLS_ALPN_RESOLVER = "letsencrypt-tls"
DNS_ZONE = "katforge.com"

# The Secret in kube-system holding the DNS-challenge IAM key; Traefik reads it through env
# valueFrom, so the key never appears in valuesContent.
CREDENTIALS_SECRET = "traefik-route53"
ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"

# Persistent volume of the chart (mounted at /data), so certificates survive restarts and
# Let's Encrypt's rate limits are not burnt by a crash loop.
ACME_STORAGE = "/data/acme.json"

# Traefik's pods carry this label; the apps' NetworkPolicies admit ingress from them.
POD_LABELS = {"app.kubernetes.io/name": "traefik"}

MEMORY_LIMIT_MIB = 256  # counted in the host's memory budget (infra/capacity.py)
RESOURCES = {
    "requests": {"cpu": "100m", "memory": "96Mi"},
    "limits": {"memory": f"{MEMORY_LIMIT_MIB}Mi"},
}


def cert_resolver(host: str) -> str:
    """The resolver that can issue a certificate for `host`."""
    inside_zone = host == DNS_ZONE or host.endswith("." + DNS_ZONE)
    return DNS_RESOLVER if inside_zone else TLS_ALPN_RESOLVER


def _secret_env(name: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": CREDENTIALS_SECRET, "key": name}}}


def values(*, acme_email: str, aws_region: str, hosted_zone_id: str, node_ip: str) -> dict:
    """The chart values: ACME resolvers, HTTP->HTTPS, persistence, client-IP-preserving Service."""
    acme = {"email": acme_email, "storage": ACME_STORAGE}
    return {
        "env": [
            {"name": "AWS_REGION", "value": aws_region},
            {"name": "AWS_HOSTED_ZONE_ID", "value": hosted_zone_id},
            _secret_env(ACCESS_KEY_ID),
            _secret_env(SECRET_ACCESS_KEY),
        ],
        "certificatesResolvers": {
            DNS_RESOLVER: {"acme": {**acme, "dnsChallenge": {"provider": "route53"}}},
            # `true`, not `{}`: the chart turns values into flags and drops empty maps.
            TLS_ALPN_RESOLVER: {"acme": {**acme, "tlsChallenge": True}},
        },
        "persistence": {"enabled": True},
        "ports": {
            "web": {"http": {"redirections": {"entryPoint": {"to": "websecure", "scheme": "https",
                                                             "permanent": True}}}},
            "websecure": {"http": {"tls": {"enabled": True, "certResolver": DNS_RESOLVER}}},
        },
        # AWS delivers the Elastic IP's traffic to the node's private address. Listing it as an external
        # IP lets kube-proxy take that traffic straight to Traefik before ServiceLB's svclb pod, which
        # masquerades; with Local the node does not SNAT either, so ipAllowList sees the real client.
        "service": {"spec": {"externalTrafficPolicy": "Local"}, "externalIPs": [node_ip]},
        "resources": RESOURCES,
    }


def values_yaml(**kwargs: str) -> str:
    """`values(...)` as the YAML text of HelmChartConfig.spec.valuesContent."""
    return yaml.safe_dump(values(**kwargs), sort_keys=True, default_flow_style=False)

"""Values for the Traefik chart that k3s bundles, handed over by HelmChartConfig kube-system/traefik.

Pure: no Pulumi here, so the values can be rendered and checked against the chart's own
values.schema.json in tests. The layout is the chart's 39+ one (TLS under
`ports.websecure.http.tls`, redirections under `ports.web.http.redirections`).
"""
from __future__ import annotations

import hashlib

import yaml

NAMESPACE = "kube-system"
RELEASE = "traefik"  # the HelmChart k3s installs; a HelmChartConfig of the same name merges into it

# Let's Encrypt through the Route53 DNS challenge, for every name: it works for names that resolve
# only inside the VPN (qa.*), since nothing has to reach Traefik from the internet. AWS_HOSTED_ZONE_ID
# stays unset, so lego finds each name's zone itself (ListHostedZonesByName) and stumper.gg's
# challenge lands in the stumper.gg zone.
DNS_RESOLVER = "letsencrypt"

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

# Rotating the DNS-challenge key changes the Secret, which Traefik reads only at start: a hash of the
# key ID in the pod template restarts it. The ID is not the credential, and the hash reveals neither.
CREDENTIALS_HASH_ANNOTATION = "katforge.com/dns-challenge-key-id-sha256"

MEMORY_LIMIT_MIB = 256  # counted in the host's memory budget (infra/capacity.py)
RESOURCES = {
    "requests": {"cpu": "100m", "memory": "96Mi"},
    "limits": {"memory": f"{MEMORY_LIMIT_MIB}Mi"},
}


def _secret_env(name: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": CREDENTIALS_SECRET, "key": name}}}


def credentials_hash(access_key_id: str) -> str:
    return hashlib.sha256(access_key_id.encode()).hexdigest()


# With k3s agents Traefik stays on the k3s host: its acme.json volume is local-path, bound to the node it
# was made on, and the Elastic IP's traffic arrives at the host (`externalIPs` below, with Local policy:
# only a node running Traefik answers it). k3s labels its server nodes with this (`kubectl get nodes`
# shows the role control-plane); the host has no taint, so no toleration is needed.
SERVER_NODE_SELECTOR = {"node-role.kubernetes.io/control-plane": "true"}


def values(*, acme_email: str, aws_region: str, node_ip: str, credentials_hash: str,
           on_server_only: bool = False) -> dict:
    """The chart values: the ACME resolver, HTTP->HTTPS, persistence, client-IP-preserving Service;
    `on_server_only` (with agents) pins the pod to the k3s host."""
    pinned = {"nodeSelector": SERVER_NODE_SELECTOR} if on_server_only else {}
    return {
        **pinned,
        "env": [
            {"name": "AWS_REGION", "value": aws_region},
            _secret_env(ACCESS_KEY_ID),
            _secret_env(SECRET_ACCESS_KEY),
        ],
        "certificatesResolvers": {DNS_RESOLVER: {"acme": {
            "email": acme_email, "storage": ACME_STORAGE, "dnsChallenge": {"provider": "route53"}}}},
        "persistence": {"enabled": True},
        # One pod at a time: two would share acme.json (and race on renewals), and a surge pod does not
        # fit the host's memory budget. The chart renders rollingUpdate only for RollingUpdate; null
        # also drops its defaults from the values, as the API refuses rollingUpdate with Recreate.
        "updateStrategy": {"type": "Recreate", "rollingUpdate": None},
        "deployment": {"podAnnotations": {CREDENTIALS_HASH_ANNOTATION: credentials_hash}},
        # The README's client-address check reads these: each request with its real source address.
        "logs": {"access": {"enabled": True}},
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


def values_yaml(**kwargs) -> str:
    """`values(...)` as the YAML text of HelmChartConfig.spec.valuesContent."""
    return yaml.safe_dump(values(**kwargs), sort_keys=True, default_flow_style=False)

"""Cluster-wide Kubernetes objects, declared by the prod stack only.

Traefik (the one k3s bundles) is configured through HelmChartConfig kube-system/traefik, with the
DNS-challenge IAM key in a kube-system Secret; the `ci` namespace holds CI's deploy account, whose
long-lived token becomes the CI kubeconfig (a secret stack output). What lives inside an app
namespace is in infra/apps.py, declared by each stage for itself.
"""
from __future__ import annotations

import base64
from typing import Mapping, Optional

import pulumi
import pulumi_kubernetes as k8s
import yaml

from infra import traefik_values
from infra.bootstrap import K3S_API_SERVER

CI_NAMESPACE = "ci"
CI_SERVICE_ACCOUNT = "deployer"
CI_TOKEN_SECRET = f"{CI_SERVICE_ACCOUNT}-token"

# k3s's CoreDNS pods carry this label; app namespaces may send DNS to them.
KUBE_DNS_LABELS = {"k8s-app": "kube-dns"}

# Pod Security admission. App pods must meet `baseline` (the images decide their user, so
# `restricted`'s runAsNonRoot cannot be promised here); `restricted` is warned and audited so
# drift shows. ci runs no pods at all.
POD_SECURITY_VERSION = "v1.34"
APP_POD_SECURITY = {"enforce": "baseline", "warn": "restricted", "audit": "restricted"}
CI_POD_SECURITY = {"enforce": "restricted", "warn": "restricted", "audit": "restricted"}


def namespace_metadata(name: str, levels: Mapping[str, str]) -> dict:
    labels = {}
    for mode, level in levels.items():
        labels[f"pod-security.kubernetes.io/{mode}"] = level
        labels[f"pod-security.kubernetes.io/{mode}-version"] = POD_SECURITY_VERSION
    return {"name": name, "labels": labels}


# What k3s's helm-controller does when the Traefik upgrade fails: "abort" leaves the release as it is
# and marks the HelmChart failed, for an operator to read. The default, "reinstall", uninstalls
# Traefik and installs it again: every site is down meanwhile, and the same values fail the same way.
# (k3s-io/helm-controller, pkg/apis/helm.cattle.io/v1/types.go, HelmChartConfigSpec.FailurePolicy.)
FAILURE_POLICY = "abort"


def helm_chart_config(values_yaml: str) -> dict:
    return {"apiVersion": "helm.cattle.io/v1", "kind": "HelmChartConfig",
            "metadata": {"name": traefik_values.RELEASE, "namespace": traefik_values.NAMESPACE},
            "spec": {"valuesContent": values_yaml, "failurePolicy": FAILURE_POLICY}}


def ci_kubeconfig(*, server: str, ca_data: str, token: str) -> str:
    """A kubeconfig for CI's ServiceAccount. `ca_data` is base64 PEM, as in the token Secret."""
    name = "katforge"
    user = f"{CI_NAMESPACE}-{CI_SERVICE_ACCOUNT}"
    return yaml.safe_dump({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority-data": ca_data}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": user, "namespace": "default"}}],
        "current-context": name,
    }, sort_keys=False)


class Cluster(pulumi.ComponentResource):
    """Traefik's configuration and CI's deploy account."""

    def __init__(self, name: str, *, acme_email: str, aws_region: str, node_ip: str,
                 access_key_id: pulumi.Input[str], secret_access_key: pulumi.Input[str],
                 provider: k8s.Provider, opts: Optional[pulumi.ResourceOptions] = None):
        super().__init__("katforge:cluster:Cluster", name, None, opts)

        def opts_(*depends_on: pulumi.Resource, **extra) -> pulumi.ResourceOptions:
            return pulumi.ResourceOptions(parent=self, provider=provider, depends_on=list(depends_on), **extra)

        credentials = k8s.core.v1.Secret(
            f"{name}-traefik-route53",
            metadata={"name": traefik_values.CREDENTIALS_SECRET, "namespace": traefik_values.NAMESPACE},
            type="Opaque",
            string_data={traefik_values.ACCESS_KEY_ID: pulumi.Output.secret(access_key_id),
                         traefik_values.SECRET_ACCESS_KEY: pulumi.Output.secret(secret_access_key)},
            opts=opts_())
        # The key ID is secret in the stack; its hash is no credential, and the values stay readable in
        # a preview.
        key_hash = pulumi.Output.unsecret(
            pulumi.Output.from_input(access_key_id).apply(traefik_values.credentials_hash))
        chart_config = helm_chart_config(key_hash.apply(
            lambda digest: traefik_values.values_yaml(acme_email=acme_email, aws_region=aws_region, node_ip=node_ip,
                                                      credentials_hash=digest)))
        # Protected: without it k3s's Traefik falls back to no certificates and no HTTPS redirect.
        k8s.apiextensions.CustomResource(
            f"{name}-traefik-config", api_version=chart_config["apiVersion"], kind=chart_config["kind"],
            metadata=chart_config["metadata"], spec=chart_config["spec"], opts=opts_(credentials, protect=True))

        namespace = k8s.core.v1.Namespace(f"{name}-ci-namespace",
                                          metadata=namespace_metadata(CI_NAMESPACE, CI_POD_SECURITY), opts=opts_())
        account = k8s.core.v1.ServiceAccount(
            f"{name}-ci-service-account", metadata={"name": CI_SERVICE_ACCOUNT, "namespace": CI_NAMESPACE},
            automount_service_account_token=False, opts=opts_(namespace))
        # A long-lived token: the token controller fills `data` and the provider waits for it.
        token = k8s.core.v1.Secret(
            f"{name}-ci-token", type="kubernetes.io/service-account-token",
            metadata={"name": CI_TOKEN_SECRET, "namespace": CI_NAMESPACE,
                      "annotations": {"kubernetes.io/service-account.name": CI_SERVICE_ACCOUNT}},
            opts=opts_(account))
        self.ci_kubeconfig = pulumi.Output.secret(token.data.apply(lambda data: ci_kubeconfig(
            server=K3S_API_SERVER, ca_data=data["ca.crt"], token=base64.b64decode(data["token"]).decode())))

        self.register_outputs({"ci_kubeconfig": self.ci_kubeconfig})

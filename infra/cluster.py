"""Cluster-wide Kubernetes objects, declared by the prod stack only.

Traefik (the one k3s bundles) is configured through HelmChartConfig kube-system/traefik, with the
DNS-challenge IAM key in a kube-system Secret; the `ci` namespace holds CI's deploy account, whose
long-lived token becomes the CI kubeconfig (a secret stack output). What lives inside an app
namespace is in infra/apps.py, declared by each stage for itself.

Every object both declare can take over a live one by import (`kube_object`). None is upserted: the
provider refuses to create an object that exists (infra/bootstrap.py, kubernetes_provider), so a live
object that `katforge:imports` does not list stops `pulumi up` at that object instead of being
overwritten. The operators' Traefik manifest file is handed over on the host before the provider
exists (infra/host/traefik-handover.sh, run by infra/bootstrap.py).
"""
from __future__ import annotations

import base64
from typing import Any, Mapping, Optional, Sequence

import pulumi
import pulumi_kubernetes as k8s
import yaml

from infra import adopt, traefik_values
from infra.bootstrap import K3S_API_SERVER
from infra.settings import invalid

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


def import_id_of(metadata: Mapping[str, str]) -> str:
    """What pulumi-kubernetes imports an object by: `namespace/name`, a cluster-wide one by `name`
    (pulumi/pulumi-kubernetes provider/pkg/provider/provider.go, Read: parseFqName(req.GetId()) splits
    the ID at "/", and an ID without one is a name without a namespace)."""
    return f"{metadata['namespace']}/{metadata['name']}" if metadata.get("namespace") else metadata["name"]


def adopted(kind: str, resource_name: str, metadata: Mapping[str, str]) -> Optional[str]:
    """The live object `katforge:imports` hands to `<kind>:<resource_name>`, or None to create it. The
    line must name the very object the resource declares: importing another one would rewrite it."""
    found = adopt.import_id(kind, resource_name)
    wanted = import_id_of(metadata)
    if found is not None and found != wanted:
        raise invalid("imports", f"{adopt.key(kind, resource_name)}={found}",
                      f"{adopt.key(kind, resource_name)}={wanted}, the object this resource declares")
    return found


def kube_object(resource_type: type, resource_name: str, *, parent: pulumi.Resource, provider: k8s.Provider,
                after: Sequence[pulumi.Resource] = (), options: Optional[Mapping[str, Any]] = None, **args):
    """Declare a Kubernetes object (`args` as its class takes them, plain `metadata` included) that
    takes over the live one `katforge:imports` lists for it. Its `<Type>` is its kind."""
    kind = args.get("kind") or resource_type.__name__
    return resource_type(resource_name, **args, opts=pulumi.ResourceOptions(
        parent=parent, provider=provider, depends_on=list(after),
        import_=adopted(kind, resource_name, args["metadata"]), **(options or {})))


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
                 provider: k8s.Provider, on_server_only: bool = False, opts: Optional[pulumi.ResourceOptions] = None):
        """`on_server_only`: with k3s agents, Traefik stays on the k3s host (infra/traefik_values.py)."""
        super().__init__("katforge:cluster:Cluster", name, None, opts)

        def declare(resource_type: type, resource_name: str, *after: pulumi.Resource, **args):
            return kube_object(resource_type, resource_name, parent=self, provider=provider, after=after, **args)

        credentials = declare(
            k8s.core.v1.Secret, f"{name}-traefik-route53",
            metadata={"name": traefik_values.CREDENTIALS_SECRET, "namespace": traefik_values.NAMESPACE},
            type="Opaque",
            string_data={traefik_values.ACCESS_KEY_ID: pulumi.Output.secret(access_key_id),
                         traefik_values.SECRET_ACCESS_KEY: pulumi.Output.secret(secret_access_key)})
        # The key ID is secret in the stack; its hash is no credential, and the values stay readable in
        # a preview.
        key_hash = pulumi.Output.unsecret(
            pulumi.Output.from_input(access_key_id).apply(traefik_values.credentials_hash))
        chart_config = helm_chart_config(key_hash.apply(
            lambda digest: traefik_values.values_yaml(acme_email=acme_email, aws_region=aws_region, node_ip=node_ip,
                                                      credentials_hash=digest, on_server_only=on_server_only)))
        # Protected: without it k3s's Traefik falls back to no certificates and no HTTPS redirect. The one the
        # operators' manifest file made is gone by now (the handover deletes it); one made otherwise is imported.
        declare(k8s.apiextensions.CustomResource, f"{name}-traefik-config", credentials,
                api_version=chart_config["apiVersion"], kind=chart_config["kind"], metadata=chart_config["metadata"],
                spec=chart_config["spec"], options={"protect": True})

        namespace = declare(k8s.core.v1.Namespace, f"{name}-ci-namespace",
                            metadata=namespace_metadata(CI_NAMESPACE, CI_POD_SECURITY))
        account = declare(k8s.core.v1.ServiceAccount, f"{name}-ci-service-account", namespace,
                          metadata={"name": CI_SERVICE_ACCOUNT, "namespace": CI_NAMESPACE},
                          automount_service_account_token=False)
        # A long-lived token: the token controller fills `data` and the provider waits for it.
        token = declare(k8s.core.v1.Secret, f"{name}-ci-token", account, type="kubernetes.io/service-account-token",
                        metadata={"name": CI_TOKEN_SECRET, "namespace": CI_NAMESPACE,
                                  "annotations": {"kubernetes.io/service-account.name": CI_SERVICE_ACCOUNT}})
        self.ci_kubeconfig = pulumi.Output.secret(token.data.apply(lambda data: ci_kubeconfig(
            server=K3S_API_SERVER, ca_data=data["ca.crt"], token=base64.b64decode(data["token"]).decode())))

        self.register_outputs({"ci_kubeconfig": self.ci_kubeconfig})

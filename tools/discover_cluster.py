"""The cluster half of `make discover`: reads, with the operator's own kubeconfig, every object at a name
the program declares, the spec's namespaces, and who owns Traefik's configuration.

The client is lightkube (pinned in requirements-tools.txt), for the `hearth` CLI too, whose `status` must
answer in under 2 s. Import time measured on 2 cores, up to the Deployment and Pod types: lightkube 0.11 s,
kr8s 0.18 s, the official `kubernetes` client 0.69 s (client, config and its API classes). lightkube is
also typed, small (httpx2, msgspec, PyYAML), has a sync client with watch and followed logs, and generic
resources for custom resources such as HelmChartConfig.

No secret value leaves this module: of a Secret only its type and key names are kept, of an object's
annotations only their names (`kubectl.kubernetes.io/last-applied-configuration` and wrangler's
`objectset.rio.cattle.io/applied` hold whole objects, data included), and of HelmChartConfig
values only where a credential sits inline.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import yaml
from lightkube import ApiError, Client, KubeConfig
from lightkube.core.resource_registry import resource_registry
from lightkube.generic_resource import create_global_resource, create_namespaced_resource

from infra.apps import PULL_SECRET
from tools.discover_targets import KubeObject, Targets

# k3s's deploy controller applies every manifest under /var/lib/rancher/k3s/server/manifests through
# wrangler's apply with the file's Addon (k3s.cattle.io/v1, kube-system/<file name up to its first
# dot>) as owner: k3s-io/k3s pkg/deploy/controller.go, watcher.deploy(), `w.apply.WithOwner(&addon)`.
# wrangler marks each applied object with these annotations (rancher/wrangler pkg/apply/
# desiredset_apply.go, GetLabelsAndAnnotations: LabelGVK, LabelName, LabelNamespace), the GVK written as
# apimachinery's GroupVersionKind.String(), "k3s.cattle.io/v1, Kind=Addon". While the file exists, the
# controller re-applies it on start and whenever it changes.
OWNER_GVK = "objectset.rio.cattle.io/owner-gvk"
OWNER_NAME = "objectset.rio.cattle.io/owner-name"
OWNER_NAMESPACE = "objectset.rio.cattle.io/owner-namespace"
ADDON_GVK = "k3s.cattle.io/v1, Kind=Addon"

# Plurals of the custom resources the program declares or discovery reads.
CRD_PLURALS = {"HelmChartConfig": "helmchartconfigs", "HelmChart": "helmcharts", "Addon": "addons",
               "IngressRoute": "ingressroutes", "Middleware": "middlewares"}
SECRET_NAME = re.compile(r"(secret|token|password|passwd|credential|private|access_?key)", re.IGNORECASE)

KATFORGE_CONFIG = Path("~/.kube/katforge-config")


def kubeconfig_path(explicit: Optional[str], environ: dict[str, str]) -> Path:
    """--kubeconfig, else the first file in $KUBECONFIG, else ~/.kube/katforge-config (the spec's)."""
    if explicit:
        return Path(explicit).expanduser()
    if environ.get("KUBECONFIG"):
        return Path(environ["KUBECONFIG"].split(":")[0]).expanduser()
    return KATFORGE_CONFIG.expanduser()


def resource_class(api_version: str, kind: str, namespaced: bool):
    if kind in CRD_PLURALS:
        group, version = api_version.split("/")
        create = create_namespaced_resource if namespaced else create_global_resource
        return create(group, version, kind, CRD_PLURALS[kind])
    return resource_registry.load(api_version, kind)


def as_dict(obj: Any) -> dict:
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def inline_secrets(values: Any, path: str = "") -> list[str]:
    """Where chart values hold a credential inline: a key that names one with a text value, or an env
    entry `{name: <secret-like>, value: ...}`. The paths, never the values."""
    found: list[str] = []
    if isinstance(values, dict):
        if isinstance(values.get("name"), str) and "value" in values and SECRET_NAME.search(values["name"]):
            found.append(f"{path}[name={values['name']}].value")
        for key, value in values.items():
            if isinstance(value, str) and SECRET_NAME.search(str(key)) and value:
                found.append(f"{path}.{key}".lstrip("."))
            else:
                found += inline_secrets(value, f"{path}.{key}".lstrip("."))
    elif isinstance(values, list):
        for i, value in enumerate(values):
            found += inline_secrets(value, f"{path}[{i}]")
    return sorted(set(found))


class Cluster:
    def __init__(self, targets: Targets, kubeconfig: Path):
        self.t = targets
        self.config = KubeConfig.from_file(kubeconfig)
        self.client = Client(self.config)
        self.secrets: list[dict] = []

    def get(self, api_version: str, kind: str, name: str, namespace: Optional[str]) -> Optional[dict]:
        try:
            return as_dict(self.client.get(resource_class(api_version, kind, namespace is not None), name,
                                           namespace=namespace))
        except ApiError as error:
            if error.status.code == 404:
                return None
            raise

    def discover(self) -> dict:
        context = self.config.get()
        objects = {target.key: self.read(target) for target in self.t.kube_objects}
        return {"server": context.cluster.server, "objects": objects, "secrets": self.secrets}

    def read(self, target: KubeObject) -> dict:
        try:
            obj = self.get(target.api_version, target.kind, target.name, target.namespace)
        except ApiError as error:
            return {"error": f"{error.status.code} {error.status.reason}: {error.status.message}"}
        if obj is None:
            return {"exists": False}
        meta = obj.get("metadata", {})
        facts: dict[str, Any] = {
            "exists": True,
            "import": {"type": target.type, "id": target.import_id} if target.type and target.import_id else None,
            "labels": meta.get("labels") or {},
            "annotations": sorted(meta.get("annotations") or {}),
            "managers": sorted({m.get("manager", "") for m in meta.get("managedFields") or []}),
            "owners": sorted(f"{o['kind']}/{o['name']}" for o in meta.get("ownerReferences") or []),
        }
        facts.update(getattr(self, f"facts_{target.kind}", lambda *_: {})(target, obj))
        if OWNER_GVK in (meta.get("annotations") or {}):
            facts["deployController"] = self.deploy_controller(meta["annotations"])
        return facts

    def deploy_controller(self, annotations: dict) -> dict:
        """Whether k3s's deploy controller owns the object, i.e. a manifest file applies it, and that file."""
        owned = annotations.get(OWNER_GVK) == ADDON_GVK
        result: dict[str, Any] = {"owned": owned, "ownerGvk": annotations.get(OWNER_GVK),
                                  "owner": f"{annotations.get(OWNER_NAMESPACE)}/{annotations.get(OWNER_NAME)}"}
        if owned:
            addon = self.get("k3s.cattle.io/v1", "Addon", annotations.get(OWNER_NAME, ""),
                             annotations.get(OWNER_NAMESPACE) or "kube-system")
            result["addon"] = ({"exists": True, "source": (addon.get("spec") or {}).get("source")} if addon
                               else {"exists": False})
        return result

    # Facts of each kind, beyond metadata ------------------------------------------------------

    def facts_Deployment(self, target: KubeObject, obj: dict) -> dict:
        spec = obj.get("spec", {})
        pod = spec.get("template", {}).get("spec", {})
        return {"replicas": spec.get("replicas"), "selector": spec.get("selector", {}).get("matchLabels", {}),
                "strategy": spec.get("strategy", {}).get("type"),
                "images": {c["name"]: c.get("image") for c in pod.get("containers", [])},
                "initImages": {c["name"]: c.get("image") for c in pod.get("initContainers") or []},
                "imagePullSecrets": sorted(s["name"] for s in pod.get("imagePullSecrets") or []),
                "readyReplicas": obj.get("status", {}).get("readyReplicas", 0)}

    def facts_Service(self, target: KubeObject, obj: dict) -> dict:
        spec = obj.get("spec", {})
        return {"type": spec.get("type"), "clusterIP": spec.get("clusterIP"), "selector": spec.get("selector") or {},
                "ports": [{k: p.get(k) for k in ("name", "port", "targetPort", "protocol", "nodePort") if p.get(k)}
                          for p in spec.get("ports", [])]}

    def facts_Secret(self, target: KubeObject, obj: dict) -> dict:
        keys = sorted(obj.get("data") or {})
        self.secrets.append({"where": f"cluster: Secret {target.namespace}/{target.name}, keys {', '.join(keys)}",
                             "configKey": secret_config_key(target.name)})
        return {"type": obj.get("type"), "keys": keys}

    def facts_PersistentVolumeClaim(self, target: KubeObject, obj: dict) -> dict:
        spec, status = obj.get("spec", {}), obj.get("status", {})
        return {"storageClassName": spec.get("storageClassName"), "accessModes": spec.get("accessModes"),
                "requested": spec.get("resources", {}).get("requests", {}).get("storage"),
                "capacity": status.get("capacity", {}).get("storage"), "volumeName": spec.get("volumeName"),
                "phase": status.get("phase")}

    def facts_HelmChartConfig(self, target: KubeObject, obj: dict) -> dict:
        try:
            values = yaml.safe_load((obj.get("spec") or {}).get("valuesContent") or "") or {}
        except yaml.YAMLError as error:
            return {"valuesError": f"valuesContent is not YAML: {type(error).__name__}"}
        inline = inline_secrets(values)
        if inline:
            self.secrets.append({"where": f"cluster: HelmChartConfig {target.namespace}/{target.name} "
                                          f"spec.valuesContent {', '.join(inline)}", "configKey": None})
        return {"valuesKeys": sorted(values) if isinstance(values, dict) else [], "inlineSecrets": inline}


def secret_config_key(name: str) -> Optional[str]:
    """The config key a live Secret's value belongs in: the registry token of the apps' pull secret."""
    return "ghcrToken" if name == PULL_SECRET else None


def discover(targets: Targets, kubeconfig: Path) -> dict:
    return Cluster(targets, kubeconfig).discover()

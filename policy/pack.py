"""The CrossGuard policies of the pack: each calls one check of policy/rules.py with what the Pulumi CLI
hands the pack, shaped as the offline plan shapes it.

How the pack sees a resource (pulumi-policy 1.21, policy.py `_PolicyAnalyzerServicer`):
- its inputs as `args.props`. The engine sends secret inputs marked (pulumi/pulumi
  sdk/go/common/resource/plugin/analyzer_plugin.go: `MarshalOptions{KeepSecrets: true}`), but the SDK's
  Analyze unwraps them into plain values; `keep_secrets_marked` makes its deserializer turn each into
  "[secret]" first (and each value unknown during a preview into "(known after deploy)", as the offline
  plan shows it), so no check ever holds a secret, and `no_plain_secrets` can tell a secret input from
  a plain one;
- `protect` as `args.opts.protect`: a resource option, which the engine sends in the request's options
  (`AnalyzerResourceOptions.protect`), not among the inputs;
- the stack's config, secrets decrypted, in the environment (`PULUMI_CONFIG`, as for the program:
  analyzer_plugin.go `constructEnv`), which gives the WireGuard port and the secret values to look for;
- which config keys are secret, in the `ConfigureStack` request (`config_secret_keys`, filled from the
  keys whose values are encrypted: pkg/engine/update.go `target.Config.SecureKeys()`), sent before any
  resource. Not in the environment: the language host sets `PULUMI_CONFIG_SECRET_KEYS` for a program
  (sdk/python/cmd/pulumi-language-python/main.go, Run) but only `PULUMI_CONFIG` for a policy pack
  (RunPlugin), and pulumi-policy's servicer keeps nothing of the request but the stack's tags.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import pulumi.runtime
import yaml
from pulumi_policy import (EnforcementLevel, ReportViolation, ResourceValidationArgs,
                           ResourceValidationPolicy, StackValidationArgs, StackValidationPolicy)
from pulumi_policy import deserialize as _deserialize
from pulumi_policy import policy as _policy
from pulumi_policy import proxy as _proxy

from policy import rules

PROJECT_FILE = Path(__file__).resolve().parent.parent / "Pulumi.yaml"
PROJECT = "katforge"
KNOWN_AFTER_DEPLOY = "(known after deploy)"
_UNKNOWN = {value for name, value in vars(_proxy).items() if name.startswith("UNKNOWN_") and name.endswith("_VALUE")}


def as_planned(value: Any) -> Any:
    """A property as the engine sends it, with secrets as "[secret]" and unknowns as the offline plan
    shows them."""
    if isinstance(value, Mapping):
        if value.get(_deserialize.SPECIAL_SIG_KEY) == _deserialize.SPECIAL_SECRET_SIG:
            return rules.SECRET + "]"
        return {key: as_planned(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_planned(item) for item in value]
    return KNOWN_AFTER_DEPLOY if value in _UNKNOWN else value


# The config keys the engine marks secret (ConfigureStack): every key set with `--secret`, declared
# secret or not (rdsMasterPassword may not be: Pulumi refuses a default on a secret key).
_engine_secret_keys: set[str] = set()


def keep_secrets_marked() -> None:
    """Make the pack's deserializer (`pulumi_policy.policy.deserialize_properties`) keep secrets marked,
    and its servicer keep the names of the secret config keys the engine sends in ConfigureStack."""
    plain = _deserialize.deserialize_properties
    _policy.deserialize_properties = lambda props, proxy_secrets=False: plain(as_planned(props), proxy_secrets)
    configure = _policy._PolicyAnalyzerServicer.ConfigureStack

    def configure_stack(servicer, request, context):
        _engine_secret_keys.clear()
        _engine_secret_keys.update(request.config_secret_keys)
        return configure(servicer, request, context)

    _policy._PolicyAnalyzerServicer.ConfigureStack = configure_stack


def _plain(value: Any) -> Any:
    """Plain data out of the SDK's read-only proxies."""
    if isinstance(value, Mapping):
        return {key: _plain(value[key]) for key in value}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(item) for item in value]
    return value


@lru_cache(maxsize=None)
def _declared() -> dict[str, dict]:
    return yaml.safe_load(PROJECT_FILE.read_text())["config"]


def wireguard_port() -> int:
    value = pulumi.runtime.get_config_env().get(f"{PROJECT}:wireguardPort", _declared()["wireguardPort"]["default"])
    return int(value)


ROOT_VOLUME_ENCRYPTED = "RootVolumeEncrypted"


def kept_unencrypted() -> list[str]:
    """The hosts whose stack sets `<host>RootVolumeEncrypted` to false itself (the default is true): a live
    unencrypted root volume kept as it is, by a decision in the stack file, never by a list of the pack's."""
    config = pulumi.runtime.get_config_env()
    return [key.removesuffix(ROOT_VOLUME_ENCRYPTED) for key in _declared() if key.endswith(ROOT_VOLUME_ENCRYPTED)
            and str(config.get(f"{PROJECT}:{key}", "")).lower() == "false"]


def secret_config() -> dict[str, str]:
    """Each secret key that the stack sets (`<namespace>:<name>`) -> its plaintext: the keys Pulumi.yaml
    declares secret and every key the engine marks secret."""
    config = pulumi.runtime.get_config_env()
    declared = {f"{PROJECT}:{key}" for key, declaration in _declared().items() if declaration.get("secret")}
    return {key: str(config[key]) for key in sorted(declared | _engine_secret_keys) if key in config}


def _resource_policy(name: str, description: str,
                     check: Callable[[ResourceValidationArgs, dict], list[str]]) -> ResourceValidationPolicy:
    def validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
        for message in check(args, _plain(args.props)):
            report_violation(message, args.urn)

    return ResourceValidationPolicy(name=name, description=description, validate=validate,
                                    enforcement_level=EnforcementLevel.MANDATORY)


def _buckets_encrypted(args: StackValidationArgs, report_violation: ReportViolation) -> None:
    resources = [{"urn": r.urn, "type": r.resource_type, "name": r.name, "inputs": _plain(r.props),
                  "options": {"property_dependencies": {prop: [d.urn for d in deps]
                                                        for prop, deps in r.property_dependencies.items()}}}
                 for r in args.resources]
    for message in rules.buckets_encrypted(resources):
        report_violation(message, None)


POLICIES = [
    _resource_policy("open-only-web-and-vpn", "Nothing but tcp 80, tcp 443 and WireGuard's udp port is open to the "
                     "world.", lambda args, inputs: rules.open_to_the_world(args.resource_type, inputs,
                                                                           wireguard_port())),
    _resource_policy("stateful-protected", "Hosts, addresses, buckets, the SES identity, RDS (deletion protection "
                     "too) and Traefik's HelmChartConfig are protected; a k3s agent holds no state.",
                     lambda args, inputs: rules.stateful_protected(args.resource_type, {"protect": args.opts.protect},
                                                                   inputs)),
    _resource_policy("encryption-at-rest", "Disks are encrypted (an adopted unencrypted root volume only when the "
                     "stack sets <host>RootVolumeEncrypted to false).",
                     lambda args, inputs: rules.encrypted_at_rest(args.resource_type, args.name, inputs,
                                                                  kept_unencrypted())),
    StackValidationPolicy(name="buckets-encrypted", description="Every bucket has server-side encryption.",
                          validate=_buckets_encrypted, enforcement_level=EnforcementLevel.MANDATORY),
    _resource_policy("imdsv2-only", "Instances require IMDSv2 session tokens.",
                     lambda args, inputs: rules.imdsv2(args.resource_type, args.name, inputs)),
    _resource_policy("no-broad-iam", "No *FullAccess or Administrator policy, attached or inline.",
                     lambda args, inputs: rules.no_broad_policies(args.resource_type, inputs)),
    _resource_policy("no-plain-secrets", "No secret config value in an input that is not secret.",
                     lambda args, inputs: rules.no_plain_secrets(inputs, secret_config())),
]

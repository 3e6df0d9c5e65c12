"""The checks beyond the cluster: each public name's certificate, each DNS name's address, the newest
backup. They run at once, each within a deadline, and one that does not answer in time is reported
"unreachable" rather than waited for.
"""
from __future__ import annotations

import datetime
import json
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, TypeVar

T = TypeVar("T")

TIMEOUT_SECONDS = 3.0
HTTPS_PORT = 443
# Traefik renews a 90-day Let's Encrypt certificate when 30 days are left (certificatesDuration 2160 h,
# Traefik's ACME documentation): under 14, renewal has been failing for over two weeks.
CERTIFICATE_WARN_DAYS = 14
# The backup timer runs daily (infra/backups.py, backupTime): older than a day and two hours, a run was missed.
BACKUP_WARN_HOURS = 26
# The dumps' keys: <stage>/<database>/<UTC timestamp>.dump, and <UTC timestamp>.manifest.json beside each
# once it completed (infra/host/backup-databases.sh: a dump counts only once its manifest exists, as the
# restore script has it).
DUMP_KEY = re.compile(r"/(?P<at>\d{8}T\d{6}Z)\.(?P<kind>dump|manifest\.json)$")


class Pending:
    """Calls running at once in daemon threads: a call stuck in a resolver or a handshake never holds
    the command up."""

    def __init__(self, calls: Mapping[str, Callable[[], T]]):
        self.started = time.monotonic()
        self.results: dict[str, T] = {}
        self.errors: dict[str, BaseException] = {}
        self.done = {key: threading.Event() for key in calls}
        for key, call in calls.items():
            threading.Thread(target=self._run, args=(key, call), daemon=True, name=f"probe {key}").start()

    def _run(self, key: str, call: Callable[[], T]) -> None:
        try:
            self.results[key] = call()
        except Exception as error:  # reported as the check's result, never a traceback
            self.errors[key] = error
        finally:
            self.done[key].set()

    def wait(self, timeout: float, late: Callable[[str, Optional[BaseException]], T]) -> dict[str, T]:
        """Each result; one not there `timeout` seconds after the start is `late(key, None)`, one that
        raised is `late(key, error)`."""
        deadline = self.started + timeout
        for event in self.done.values():
            event.wait(max(0.0, deadline - time.monotonic()))
        return {key: self.results[key] if key in self.results else late(key, self.errors.get(key))
                for key in self.done}


# --- where to connect ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConnectTo:
    """curl's --connect-to NAME:PORT:ADDRESS:PORT: connect there instead of to the declared address
    (an empty name or port matches any), e.g. through an SSH tunnel."""
    name: str
    port: str
    address: str
    to_port: str

    @classmethod
    def parse(cls, text: str) -> "ConnectTo":
        parts = text.rsplit(":", 3) if text.count(":") >= 3 else []
        if len(parts) != 4 or not parts[2]:
            raise ValueError(f"--connect-to {text}: expected NAME:PORT:ADDRESS:PORT (NAME and PORT may be empty)")
        return cls(*parts)

    def matches(self, name: str, port: int) -> bool:
        return self.name in ("", name) and self.port in ("", str(port))


def endpoint(name: str, address: str, port: int, overrides: tuple[ConnectTo, ...]) -> tuple[str, int]:
    found = next((o for o in overrides if o.matches(name, port)), None)
    return (found.address, int(found.to_port or port)) if found else (address, port)


# --- certificates ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Probe:
    """What a check found: `state` is `ok` or what is wrong; `facts` go into the report as they are."""
    state: str
    message: str
    facts: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.state == "ok"


def _not_after(der: bytes) -> datetime.datetime:
    # Only for a certificate the handshake could not verify (its dates are not in getpeercert() then).
    from cryptography import x509
    return x509.load_der_x509_certificate(der).not_valid_after_utc


def _handshake(name: str, address: str, port: int, timeout: float, verify: bool):
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((address, port), timeout=timeout) as sock:
        with context.wrap_socket(sock, server_hostname=name) as tls:
            return tls.getpeercert(), tls.getpeercert(binary_form=True)


def certificate(name: str, address: str, port: int, now: datetime.datetime, timeout: float = TIMEOUT_SECONDS) -> Probe:
    """A real TLS handshake with `name` (SNI) at `address`: the days until its certificate expires, and
    whether the system's trust store accepts it for that name."""
    where = {"name": name, "address": address, "port": port}
    trusted, reason = True, ""
    try:
        try:
            cert, der = _handshake(name, address, port, timeout, verify=True)
            expires = datetime.datetime.fromtimestamp(ssl.cert_time_to_seconds(cert["notAfter"]), datetime.timezone.utc)
        except ssl.SSLCertVerificationError as error:
            trusted, reason = False, error.verify_message or str(error)
            _, der = _handshake(name, address, port, timeout, verify=False)
            expires = _not_after(der)
    except (OSError, ssl.SSLError) as error:
        return Probe("unreachable", f"no TLS handshake with {address}:{port}: {_reason(error)}", where)
    days = (expires - now).days if expires >= now else -((now - expires).days + 1)
    facts = {**where, "expiresAt": expires.strftime("%Y-%m-%dT%H:%M:%SZ"), "daysLeft": days, "trusted": trusted}
    if days < 0:
        return Probe("expired", f"expired {-days} days ago", facts)
    if not trusted:
        return Probe("untrusted", f"not trusted: {reason}", facts)
    if days < CERTIFICATE_WARN_DAYS:
        return Probe("expiring", f"expires in {days} days: Traefik renews at 30 days left, so renewal is failing "
                                 "(kubectl -n kube-system logs deploy/traefik)", facts)
    return Probe("ok", f"expires in {days} days", facts)


def _reason(error: BaseException) -> str:
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "timed out"
    return getattr(error, "strerror", None) or getattr(error, "reason", None) or str(error) or type(error).__name__


# --- DNS -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DnsServer:
    """Resolve through this server (ADDRESS[:PORT]) instead of the system's resolver."""
    address: str
    port: int = 53

    @classmethod
    def parse(cls, text: str) -> "DnsServer":
        address, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
        try:
            return cls(address or text, int(port) if port else 53)
        except ValueError:
            raise ValueError(f"--dns-server {text}: expected ADDRESS or ADDRESS:PORT") from None


class Unresolved(Exception):
    pass


def _resolve_system(name: str) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)}
    except socket.gaierror as error:
        raise Unresolved(f"does not resolve ({error.strerror})") from None


def _resolve_with(name: str, server: DnsServer, timeout: float) -> set[str]:
    import dns.exception
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port, resolver.lifetime = [server.address], server.port, timeout
    try:
        return {record.address for record in resolver.resolve(name, "A", search=False)}
    except dns.resolver.NXDOMAIN:
        raise Unresolved("does not resolve (NXDOMAIN)") from None
    except dns.resolver.NoAnswer:
        raise Unresolved("has no A record") from None
    except (dns.resolver.NoNameservers, dns.exception.Timeout) as error:
        raise TimeoutError(str(error)) from None


def resolves(name: str, declared: str, server: Optional[DnsServer], timeout: float = TIMEOUT_SECONDS) -> Probe:
    facts = {"name": name, "declared": declared, "resolved": []}
    try:
        found = _resolve_with(name, server, timeout) if server else _resolve_system(name)
    except Unresolved as error:
        return Probe("unresolved", str(error), facts)
    except (OSError, TimeoutError) as error:
        return Probe("unreachable", f"no answer from {'the resolver' if not server else server.address}: "
                                    f"{_reason(error)}", facts)
    facts["resolved"] = sorted(found)
    if found != {declared}:
        return Probe("wrong", f"resolves to {', '.join(sorted(found))}, declared {declared}", facts)
    return Probe("ok", f"resolves to {declared}", facts)


# --- backups -------------------------------------------------------------------------------------------

def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError


def _from_s3(read: Callable, url: str, facts: dict, region: str, timeout: float,
             absent: Optional[Callable[[], Probe]] = None):
    """`read(s3)`, with the operator's AWS credentials (AWS_PROFILE or the environment; AWS_ENDPOINT_URL is
    honoured by boto3 itself), within `timeout`; its failure as the check's Probe, about `url`. An absent
    key is `absent()`, where the check has a word for it."""
    import boto3
    import botocore.config
    import botocore.exceptions

    config = botocore.config.Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1})
    try:
        return read(boto3.session.Session().client("s3", region_name=region, config=config))
    except botocore.exceptions.NoCredentialsError:
        return Probe("error", "no AWS credentials: set AWS_PROFILE (or the AWS_* variables) to an identity with "
                              "the katforge-backup-restore policy", facts)
    except botocore.exceptions.ClientError as error:
        detail = error.response.get("Error", {})
        if absent and detail.get("Code") in ("NoSuchKey", "404"):
            return absent()
        return Probe("error", f"{url}: {detail.get('Code')}: {detail.get('Message')}", facts)
    except (botocore.exceptions.BotoCoreError, OSError) as error:
        return Probe("unreachable", f"{url}: {error}", facts)


def newest_backup(bucket: str, prefix: str, region: str, now: datetime.datetime,
                  timeout: float = TIMEOUT_SECONDS) -> Probe:
    """The newest complete dump under the stage's prefix."""
    facts = {"bucket": bucket, "prefix": prefix}

    def listing(s3) -> tuple[dict, set]:
        dumps, manifests = {}, set()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                match = DUMP_KEY.search(obj["Key"])
                if match and match["kind"] == "dump":
                    dumps[match["at"]] = obj
                elif match:
                    manifests.add(match["at"])
        return dumps, manifests

    found = _from_s3(listing, f"s3://{bucket}", facts, region, timeout)
    if isinstance(found, Probe):
        return found
    dumps, manifests = found
    complete = {at: obj for at, obj in dumps.items() if at in manifests}
    if not complete:
        return Probe("missing", f"no {'complete ' if dumps else ''}dump under s3://{bucket}/{prefix}", facts)
    at = max(complete)
    obj = complete[at]
    unfinished = max((later for later in dumps if later > at and later not in manifests), default=None)
    taken = datetime.datetime.strptime(at, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
    age = now - taken
    facts.update({"key": obj["Key"], "takenAt": taken.strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "ageSeconds": int(age.total_seconds()), "sizeBytes": obj["Size"]})
    hours = age.total_seconds() / 3600
    if unfinished:
        facts["incompleteKey"] = f"{prefix}{unfinished}.dump"
        return Probe("incomplete", f"the newest dump, {unfinished}, has no manifest: it did not complete (or is "
                                   f"uploading now); the newest complete one is {hours:.0f} h old", facts)
    if hours > BACKUP_WARN_HOURS:
        return Probe("stale", f"the newest dump is {hours:.0f} h old, over {BACKUP_WARN_HOURS} h: the daily backup "
                              "has not run (on the k3s host: journalctl -u katforge-backup)", facts)
    return Probe("ok", f"{_size(obj['Size'])}, {hours:.0f} h old", facts)


# The monthly restore drill's result (infra/host, katforge-drill): <stage>/drill/latest.json, published
# again with each daily backup, so its `started` dates the drill, not the object.
DRILL_WARN_DAYS = 35


def last_drill(bucket: str, stage: str, region: str, now: datetime.datetime, timeout: float = TIMEOUT_SECONDS) -> Probe:
    key = f"{stage}/drill/latest.json"
    facts = {"bucket": bucket, "key": key}
    result = _from_s3(lambda s3: s3.get_object(Bucket=bucket, Key=key)["Body"].read(), f"s3://{bucket}/{key}", facts,
                      region, timeout, absent=lambda: Probe(
                          "missing", f"no drill has run: s3://{bucket}/{key} is absent (make drill STAGE={stage})", facts))
    if isinstance(result, Probe):
        return result
    try:
        result = json.loads(result)
    except ValueError as error:
        return Probe("error", f"s3://{bucket}/{key} is not JSON: {error}", facts)
    started = datetime.datetime.fromisoformat(str(result.get("started", "")).replace("Z", "+00:00"))
    days = (now - started).days
    facts.update({"started": started.strftime("%Y-%m-%dT%H:%M:%SZ"), "passed": bool(result.get("ok")),
                  "dump": result.get("dump")})
    if not result.get("ok"):
        why = result.get("error") or "; ".join(result.get("mismatches") or []) or "no reason given"
        return Probe("failed", f"the drill of {started:%Y-%m-%d} failed: {why}", facts)
    if days > DRILL_WARN_DAYS:
        return Probe("stale", f"the last drill is {days} days old, over {DRILL_WARN_DAYS}: the monthly drill has not "
                              "run (on the k3s host: journalctl -u 'katforge-drill@*')", facts)
    seconds = (result.get("seconds") or {}).get("restore")
    return Probe("ok", f"{result.get('dump', '').rsplit('/', 1)[-1]} restored"
                       + (f" in {seconds:.0f} s" if isinstance(seconds, (int, float)) else "")
                       + f", {days} days ago", facts)

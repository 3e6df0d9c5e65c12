"""A lease on a CI WireGuard peer, kept as one object in the state bucket: previews of different pull
requests run at the same time (their concurrency groups are per pull request, so GitHub never cancels
one for another), and this makes those of one stack take turns on the stack's peer: two runners with
one key steal each other's tunnel.

    python -m tools.lock acquire --backend-url s3://<bucket>?region=... --peer ci-preview-prod --owner <run>
    python -m tools.lock release --backend-url ... --peer ci-preview-prod --owner <run>

Taking the lease is one conditional write (`If-None-Match: *`, S3 User Guide, "Conditional writes"): of
two runners only one succeeds. A lease expires (`--ttl`, longer than the job may run), so a runner that
died without releasing holds the peer no longer than that; a waiter takes over an expired lease with a
write conditional on the expired object's ETag (`If-Match`), so again only one does. Releasing deletes
the lease only if it is still the owner's.

It uses the AWS CLI (on GitHub's runners; requirements-test.txt pins one for the tests), with the
credentials of the assumed role.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlparse

from infra.policies import CI_LOCK_PREFIX

CONTENDED = {"PreconditionFailed", "ConditionalRequestConflict"}  # 412; 409 when two writes race
CONDITION_FLAGS = {"IfNoneMatch": "--if-none-match", "IfMatch": "--if-match"}  # PutObject's, as the CLI names them


class S3Error(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def bucket_of(backend_url: str) -> str:
    """The bucket of a DIY backend URL, s3://<bucket>[/<prefix>][?region=...]."""
    url = urlparse(backend_url)
    if url.scheme != "s3" or not url.netloc:
        raise SystemExit(f"lock: {backend_url!r} is not an s3://<bucket> backend URL")
    return url.netloc


class S3:
    """The three calls a lease needs, through the AWS CLI."""

    def __init__(self, bucket: str, aws: str = "aws"):
        self.bucket, self.aws = bucket, aws

    def _call(self, *args: str) -> dict:
        result = subprocess.run([self.aws, "s3api", *args, "--bucket", self.bucket, "--output", "json"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            code = re.search(r"An error occurred \((\w+)\)", result.stderr)
            raise S3Error(code.group(1) if code else "", result.stderr.strip())
        return json.loads(result.stdout or "{}")

    def put(self, key: str, body: str, condition: dict[str, str]) -> None:
        """Write `key` only if `condition` holds: {"IfNoneMatch": "*"} or {"IfMatch": <ETag>}."""
        flags = [item for name, value in condition.items() for item in (CONDITION_FLAGS[name], value)]
        with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
            file.write(body)
            file.flush()
            self._call("put-object", "--key", key, "--body", file.name, *flags)

    def get(self, key: str) -> Optional[tuple[dict, str]]:
        """The lease and its ETag, or None when there is none."""
        with tempfile.TemporaryDirectory() as scratch:
            target = Path(scratch) / "lease.json"
            try:
                meta = self._call("get-object", "--key", key, str(target))
            except S3Error as error:
                if error.code in ("NoSuchKey", "404"):
                    return None
                raise
            return json.loads(target.read_text()), meta["ETag"]

    def delete(self, key: str) -> None:
        self._call("delete-object", "--key", key)


def lease_key(peer: str) -> str:
    return f"{CI_LOCK_PREFIX}/wireguard-{peer}.json"


def acquire(s3: S3, peer: str, owner: str, ttl: int, wait: int, poll: float = 15,
            clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> None:
    key, deadline = lease_key(peer), clock() + wait
    while True:
        body = json.dumps({"owner": owner, "expires": int(clock() + ttl)})
        try:
            s3.put(key, body, {"IfNoneMatch": "*"})
            print(f"lock: {peer} is ours ({owner}) for at most {ttl} s")
            return
        except S3Error as error:
            if error.code not in CONTENDED:
                raise
        held = s3.get(key)
        if held is not None:
            lease, etag = held
            if lease.get("owner") == owner:
                print(f"lock: {peer} is already ours ({owner})")
                return
            if lease.get("expires", 0) < clock():
                try:
                    s3.put(key, body, {"IfMatch": etag})
                    print(f"lock: {peer} taken over from {lease.get('owner')}, whose lease had expired")
                    return
                except S3Error as error:
                    if error.code not in CONTENDED:
                        raise
                    continue  # another waiter took it first: look again
            if clock() >= deadline:
                raise SystemExit(f"lock: {peer} is still held by {lease.get('owner')} (until "
                                 f"{time.strftime('%H:%M:%S UTC', time.gmtime(lease.get('expires', 0)))}); "
                                 "gave up waiting")
            print(f"lock: {peer} is held by {lease.get('owner')}; waiting", flush=True)
        sleep(poll)


def release(s3: S3, peer: str, owner: str) -> None:
    held = s3.get(lease_key(peer))
    if held is None or held[0].get("owner") != owner:
        print(f"lock: {peer} is not held by {owner}; nothing to release")
        return
    s3.delete(lease_key(peer))
    print(f"lock: {peer} released")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.lock", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("acquire", "release"))
    parser.add_argument("--backend-url", required=True, help="PULUMI_BACKEND_URL: the lease lives in its bucket")
    parser.add_argument("--peer", required=True, help="the WireGuard peer's name in katforge:wireguardPeers")
    parser.add_argument("--owner", required=True, help="who holds it: the run, its attempt and the job")
    parser.add_argument("--ttl", type=int, default=90 * 60, help="seconds until the lease expires (default 5400)")
    parser.add_argument("--wait", type=int, default=60 * 60, help="seconds to wait for the peer (default 3600)")
    parser.add_argument("--poll", type=float, default=15, help="seconds between looks (default 15)")
    args = parser.parse_args(argv)
    s3 = S3(bucket_of(args.backend_url))
    if args.action == "acquire":
        acquire(s3, args.peer, args.owner, args.ttl, args.wait, args.poll)
    else:
        release(s3, args.peer, args.owner)


if __name__ == "__main__":
    sys.exit(main())

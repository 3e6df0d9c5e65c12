"""How fast `hearth` answers, as an operator types it: `hearth status` from start to exit (target: under
2 s) and `hearth logs` from start to its first line (target: within 1 s), each a fresh process (imports
included) against the local estate the tests use: the API server with the running estate
(tests/kube_api.py), a TLS server with the test CA's certificates, a DNS server, and moto's S3 with the
backup bucket. Every probe goes to 127.0.0.1. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/hearth_speed.py [--runs N]
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infra.apps import routed_hosts  # noqa: E402
from tests.dns_server import DnsServer  # noqa: E402
from tests.kube_api import serve_running  # noqa: E402
from tests.live_account import MotoServer  # noqa: E402
from tests.tls_server import Authority, TlsServer  # noqa: E402

STATUS_TARGET, LOGS_TARGET = 2.0, 1.0


def command() -> list[str]:
    """The installed console script (`make hearth`), else the module it runs."""
    script = ROOT / ".venv" / "bin" / "hearth"
    return [str(script)] if script.exists() else [sys.executable, "-m", "hearth"]


def status_seconds(env: dict, probes: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run([*command(), "status", *probes], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, done.returncode


def first_log_line_seconds(env: dict) -> float:
    start = time.perf_counter()
    process = subprocess.Popen([*command(), "logs"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
    process.stdout.readline()
    took = time.perf_counter() - start
    process.terminate()
    process.wait()
    return took


def figures(name: str, values: list[float], target: float) -> None:
    print(f"{name:<28} median {statistics.median(values):.2f} s, min {min(values):.2f} s, max {max(values):.2f} s "
          f"(target under {target:g} s: {'met' if max(values) < target else 'MISSED'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    scratch = Path(tempfile.mkdtemp(prefix="hearth-speed-"))
    api = serve_running(now)
    authority = Authority(scratch)
    tls = TlsServer(authority.issue("estate", routed_hosts(), now + datetime.timedelta(days=60)))
    from hearth.estate import declared_addresses
    from infra.dns import RECORDS
    from tools.offline import effective_config
    addresses = declared_addresses(effective_config("prod")[0])
    dns = DnsServer({r.name: ("CNAME", r.target) if r.type == "CNAME" else ("A", addresses[r.name]) for r in RECORDS})
    moto = MotoServer()
    try:
        account = moto.account()
        s3 = account.client("s3")
        s3.create_bucket(Bucket="hearth-speed", CreateBucketConfiguration={"LocationConstraint": "us-east-2"})
        stamp = (now - datetime.timedelta(hours=5)).strftime("%Y%m%dT%H%M%SZ")
        s3.put_object(Bucket="hearth-speed", Key=f"prod/katforge/{stamp}.dump", Body=b"x" * 1024)
        s3.put_object(Bucket="hearth-speed", Key=f"prod/katforge/{stamp}.manifest.json", Body=b"{}")
        s3.put_object(Bucket="hearth-speed", Key="prod/drill/latest.json", Body=json.dumps(
            {"stage": "prod", "ok": True, "started": stamp[:4] + "-" + stamp[4:6] + "-" + stamp[6:8] + "T00:00:00Z",
             "dump": f"prod/katforge/{stamp}.dump", "seconds": {"restore": 31.2}}).encode())
        env = {**os.environ, **account.env(), "BACKUP_BUCKET": "hearth-speed", "SSL_CERT_FILE": str(authority.ca_file),
               "KUBECONFIG": str(api.kubeconfig(scratch / "katforge-config"))}
        probes = ["--dns-server", dns.address, "--connect-to", f"::127.0.0.1:{tls.port}"]
        print(f"hearth: {' '.join(command())}; {runs} runs each, a fresh process every time")
        status_runs = [status_seconds(env, probes) for _ in range(runs)]
        codes = {code for _, code in status_runs}
        figures("status (start to exit)", [s for s, _ in status_runs], STATUS_TARGET)
        print(f"{'':<28} exit status {', '.join(map(str, sorted(codes)))} (0: healthy)")
        figures("logs (start to first line)", [first_log_line_seconds(env) for _ in range(runs)], LOGS_TARGET)
        start = time.perf_counter()
        subprocess.run([*command(), "--help"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, check=True)
        print(f"{'--help (imports alone)':<28} {time.perf_counter() - start:.2f} s")
    finally:
        moto.stop()
        dns.stop()
        tls.stop()
        api.stop()


if __name__ == "__main__":
    main()

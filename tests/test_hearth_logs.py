"""`hearth logs` against the running estate (tests/kube_api.py): followed across a rollout and a
restart, with `--since`, without following, and left with Ctrl-C. The following runs as the real command
in a process of its own, as an operator runs it."""
from __future__ import annotations

import io
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from hearth.cli import main
from hearth.logs import Printer
from tests.kube_api import Reply, Reset, iso, status
from tests.test_hearth_status import Result
from tools.offline import ROOT

pytest_plugins = ["tests.kube_api"]
WAIT = 10  # seconds a line may take to show up before the test fails (it takes milliseconds)


@pytest.fixture
def kubeconfig(running_cluster, tmp_path):
    return running_cluster.kubeconfig(tmp_path / "katforge-config")


def pods_of(api, app: str, namespace: str = "default") -> list[str]:
    return sorted(name for (kind, ns, name), obj in api.objects.items()
                  if kind.kind == "Pod" and ns == namespace and obj["metadata"]["labels"]["app"] == app)


class Tail:
    """The command's output, line by line, as it comes."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.lines: "queue.Queue[tuple[str, str]]" = queue.Queue()
        self.seen: list[tuple[str, str]] = []
        for name in ("stdout", "stderr"):
            threading.Thread(target=self._read, args=(name,), daemon=True).start()

    def _read(self, name: str) -> None:
        for line in getattr(self.process, name):
            self.lines.put((name, line.rstrip("\n")))

    def expect(self, stream: str, text: str) -> str:
        """Wait for a line of `stream` containing `text`; fail after WAIT seconds."""
        for seen_stream, line in self.seen:
            if seen_stream == stream and text in line:
                return line
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                item = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(item)
            if item[0] == stream and text in item[1]:
                return item[1]
        raise AssertionError(f"no {stream} line with {text!r} within {WAIT} s; seen: {self.seen}")

    def drain(self) -> list[tuple[str, str]]:
        while True:
            try:
                self.seen.append(self.lines.get(timeout=0.2))
            except queue.Empty:
                return self.seen


def test_follows_across_a_rollout_and_a_restart_and_leaves_on_ctrl_c(running_cluster, kubeconfig):
    api = running_cluster
    with api.kept():
        [web_pod], [api_pod] = pods_of(api, "web"), pods_of(api, "api")
        api.write_log("default", web_pod, "web", "three hours old, before --since", at=time.time() - 3 * 3600)
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        process = subprocess.Popen([sys.executable, "-m", "hearth", "logs", "web", "api", "--since", "1h"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        tail = Tail(process)
        try:
            web_suffix, api_suffix = web_pod.rsplit("-", 1)[1], api_pod.rsplit("-", 1)[1]
            tail.expect("stdout", f'web/{web_suffix} 10.42.0.1 - - "GET /web/2 HTTP/1.1" 200 512')
            tail.expect("stdout", f"api/{api_suffix}:migrate [notice] finished in 41.3ms")

            api.write_log("default", api_pod, "api", "a line written while followed")
            tail.expect("stdout", f"api/{api_suffix} a line written while followed")

            # a rollout of web: the new pod is attached from its first line, the old one dropped
            web = api.get("apps/v1", "Deployment", "web", "default")
            for container in web["spec"]["template"]["spec"]["containers"] + web["spec"]["template"]["spec"]["initContainers"]:
                container["image"] = "ghcr.io/katforge/katforge.com:v1.5.0"
            web["metadata"]["generation"] += 1
            api.add(web)
            started = tail.expect("stderr", "started")
            new_suffix = started.split("web/", 1)[1].split()[0]
            assert new_suffix != web_suffix
            tail.expect("stdout", f"web/{new_suffix}:migrate [notice] Migrating up to DoctrineMigrations")
            tail.expect("stdout", f'web/{new_suffix} 10.42.0.1 - - "GET /web/1 HTTP/1.1" 200 512')
            tail.expect("stderr", f"hearth: web/{web_suffix} ended")

            # api's container restarts: its next run is a stream of its own
            api.end_log("default", api_pod, "api", restart=True)
            pod = api.get("v1", "Pod", api_pod, "default")
            [status] = pod["status"]["containerStatuses"]
            status.update(restartCount=1, lastState={"terminated": {"exitCode": 137, "reason": "OOMKilled",
                                                                    "startedAt": iso(api.now), "finishedAt": iso(api.now)}})
            api.add(pod)
            api.write_log("default", api_pod, "api", "the second run's first line")
            tail.expect("stdout", f"api/{api_suffix} the second run's first line")
        finally:
            running_cluster.controller.settle()
            process.send_signal(signal.SIGINT)
            code = process.wait(timeout=WAIT)
    seen = tail.drain()
    assert code == 130
    assert not any("Traceback" in line for _, line in seen), seen
    out = [line for stream, line in seen if stream == "stdout"]
    assert not any("before --since" in line for line in out)
    assert not any(line.startswith(("lextris/", "stumper/")) for line in out)  # only the apps asked for
    assert sum("the second run's first line" in line for line in out) == 1  # each run followed once


def run(kubeconfig, *argv: str) -> Result:
    out, err = io.StringIO(), io.StringIO()
    code = main(["logs", "--kubeconfig", str(kubeconfig), *argv], environ=os.environ, stdout=out, stderr=err)
    return Result(code, out.getvalue(), err.getvalue())


def test_without_following(running_cluster, kubeconfig):
    result = run(kubeconfig, "--no-follow", "--qa")
    assert (result.code, result.err) == (0, "")
    [api_pod], [web_pod] = pods_of(running_cluster, "api", "qa"), pods_of(running_cluster, "web", "qa")
    a, w = api_pod.rsplit("-", 1)[1], web_pod.rsplit("-", 1)[1]
    assert result.out.splitlines() == [
        f"api/{a}:migrate [notice] Migrating up to DoctrineMigrations\\Version20250301120000",
        f"api/{a}:migrate [notice] finished in 41.3ms, used 18M memory, 1 migrations executed, 2 sql queries",
        *(f'api/{a} 10.42.0.1 - - "GET /api/{i} HTTP/1.1" 200 512' for i in range(3)),
        f"web/{w}:migrate [notice] Migrating up to DoctrineMigrations\\Version20250301120000",
        f"web/{w}:migrate [notice] finished in 41.3ms, used 18M memory, 1 migrations executed, 2 sql queries",
        *(f'web/{w} 10.42.0.1 - - "GET /web/{i} HTTP/1.1" 200 512' for i in range(3)),
    ]


def test_since_reaches_back_no_further(running_cluster, kubeconfig):
    """The estate's lines were written a minute before it was served."""
    assert run(kubeconfig, "stumper", "--no-follow", "--since", "1s").out == ""
    assert len(run(kubeconfig, "stumper", "--no-follow", "--since", "1h").out.splitlines()) == 5


def test_an_unknown_app_or_duration(kubeconfig):
    unknown = run(kubeconfig, "shop")
    assert (unknown.code, unknown.out) == (2, "")
    assert unknown.err == "hearth: shop: not an app of prod (its apps: api, web, lextris, stumper)\n"
    bad = run(kubeconfig, "--since", "soon")
    assert bad.code == 2 and bad.err.startswith("hearth: hearth logs: argument --since: 'soon': expected a duration")


def breaking_off(*lines: str):
    """A log stream that sends `lines` and then is reset, as a dropped connection looks to the client."""
    def body():
        yield "".join(f"{line}\n" for line in lines).encode()
        time.sleep(0.2)  # the lines reach the client before the reset does
        raise Reset
    return lambda: Reply(200, body(), "text/plain")


QA_LOGS = r"^/api/v1/namespaces/qa/pods/[^/]+/log$"


def test_an_error_answer_or_a_stream_that_breaks_off_without_following(running_cluster, kubeconfig):
    with running_cluster.answering("GET", r"^/api/v1/namespaces/qa/pods$",
                                   lambda: status(500, "InternalError", "etcdserver: leader changed")):
        refused = run(kubeconfig, "--no-follow", "--qa")
    with running_cluster.answering("GET", QA_LOGS, breaking_off("the line before")):
        broken = run(kubeconfig, "--no-follow", "--qa")
    assert (refused.code, refused.out) == (2, "")
    assert refused.err == (f"hearth: the cluster at {running_cluster.url} answered GET /api/v1/namespaces/qa/pods "
                           "with 500: etcdserver: leader changed\n")
    [api_pod] = pods_of(running_cluster, "api", "qa")
    assert broken.code == 2 and broken.out == ""  # without following, a log is read whole before it is printed
    assert broken.err.count("\n") == 1 and broken.err.startswith(
        f"hearth: the connection to the cluster at {running_cluster.url} broke off during GET "
        f"/api/v1/namespaces/qa/pods/{api_pod}/log (")


def test_a_stream_that_breaks_off_while_following_ends_the_command(running_cluster, kubeconfig):
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    with running_cluster.answering("GET", QA_LOGS, breaking_off("the line before")):
        done = subprocess.run([sys.executable, "-m", "hearth", "logs", "--qa", "api"], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=WAIT * 3)
    [api_pod] = pods_of(running_cluster, "api", "qa")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(
        f"hearth: the connection to the cluster at {running_cluster.url} broke off during GET "
        f"/api/v1/namespaces/qa/pods/{api_pod}/log ("), done.stderr
    assert f"api/{api_pod.rsplit('-', 1)[1]}:migrate the line before" in done.stdout.splitlines()


def test_each_app_has_its_color_on_a_terminal():
    printer = Printer(io.StringIO(), io.StringIO(), ["api", "web"], color=True)
    assert printer.prefix("api", "api-5d7f9c8b6d-x7k2p", "api") == "\x1b[36mapi/x7k2p\x1b[0m"
    assert printer.prefix("web", "web-5d7f9c8b6d-q4r8s", "migrate") == "\x1b[35mweb/q4r8s:migrate\x1b[0m"
    assert Printer(io.StringIO(), io.StringIO(), ["api"], color=False).prefix("api", "api-1-x7k2p", "api") == "api/x7k2p"

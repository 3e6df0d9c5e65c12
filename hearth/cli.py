"""The `hearth` command line: status, logs and rollback of a stage's apps.

Exit status: 0 when all is well; 1 when the answer is no (something is unhealthy, a rollback is refused
or its rollout failed); 2 when hearth could not ask (bad usage, no kubeconfig, an unreachable cluster);
130 after Ctrl-C. Every failure is one line on stderr.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Mapping, Optional, Sequence, TextIO

from hearth import probes
from hearth.kube import EXIT_USAGE, Cluster, HearthError

EXIT_INTERRUPTED = 130
COLORS = {"ok": "32", "progressing": "33", "expiring": "33", "stale": "33"}  # anything else: red


def _duration(text: str) -> float:
    """10s, 10m, 2h, 1d (kubectl's --since forms, and days) in seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a duration such as 30s, 10m, 2h or 1d") from None


def _parse(kind, text: str):
    try:
        return kind.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, as argparse does, without the usage block
        raise HearthError(f"{self.prog}: {message} (see {self.prog.split()[0]} --help)", EXIT_USAGE)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--kubeconfig", help="the kubeconfig to use (default: $KUBECONFIG, else ~/.kube/katforge-config)")
    common.add_argument("--qa", action="store_true", help="the qa stage (namespace qa) instead of prod (namespace default)")
    top = _Parser(prog="hearth", description="Status, logs and rollback of the Katforge estate's apps, with your "
                                             "own kubeconfig (read-only but for rollback).")
    commands = top.add_subparsers(dest="command", required=True, parser_class=_Parser)
    status = commands.add_parser("status", parents=[common], help="deployed versions, pod health and the estate's checks",
                                 description="Exit 1 when anything is unhealthy.")
    status.add_argument("--json", action="store_true", help="the report as JSON (schema: hearth/status.schema.json)")
    status.add_argument("--dns-server", metavar="ADDRESS[:PORT]", type=lambda t: _parse(probes.DnsServer, t),
                        help="resolve the DNS names through this server (default: the system's resolver)")
    status.add_argument("--connect-to", metavar="NAME:PORT:ADDRESS:PORT", action="append", default=[],
                        type=lambda t: _parse(probes.ConnectTo, t),
                        help="as curl's: make the TLS checks of NAME:PORT connect there (empty NAME or PORT: any), "
                             "e.g. ::127.0.0.1:8443 through an SSH tunnel; default: each name's declared address")
    status.add_argument("--timeout", type=float, default=probes.TIMEOUT_SECONDS, metavar="SECONDS",
                        help="how long each TLS, DNS and backup check may take (default: %(default)g)")
    logs = commands.add_parser("logs", parents=[common], help="follow the logs of the apps' pods, color-prefixed",
                               description="Keeps following across rollouts and restarts; Ctrl-C leaves.")
    logs.add_argument("apps", nargs="*", metavar="APP", help="the apps to follow (default: all of the stage's)")
    logs.add_argument("--since", type=_duration, default="10m", help="start this far back (default: %(default)s)")
    logs.add_argument("--no-follow", action="store_true", help="print what is there and leave")
    rollback = commands.add_parser("rollback", parents=[common], help="kubectl rollout undo: back to the previous ReplicaSet",
                                   description="Puts back the revision's whole pod template (shown, beyond the "
                                               "images, before asking), then waits for the rollout like kubectl "
                                               "rollout status; a failed migration exits 1 with its reason.")
    rollback.add_argument("app", metavar="APP")
    rollback.add_argument("--to-revision", type=int, default=0, metavar="N",
                          help="the revision to go back to (default: the previous one)")
    rollback.add_argument("--image-only", action="store_true",
                          help="set only the revision's images (as kubectl set image would), keeping the rest of the "
                               "pod template: env, probes, resources, init containers, annotations")
    rollback.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    rollback.add_argument("--timeout", type=_duration, default="0", metavar="DURATION",
                          help="stop waiting after this long, e.g. 5m (default: 0, until the Deployment's progress "
                               "deadline fails it)")
    return top


def _colored(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Colors on a terminal, unless NO_COLOR is set (no-color.org)."""
    return stream.isatty() and not environ.get("NO_COLOR")


def _paint(stream: TextIO, environ: Mapping[str, str]):
    if not _colored(stream, environ):
        return lambda state, text: text
    return lambda state, text: f"\x1b[{COLORS.get(state, '31')}m{text}\x1b[0m"


def main(argv: Optional[Sequence[str]] = None, *, environ: Mapping[str, str] = os.environ,
         stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr,
         now: Optional[datetime.datetime] = None) -> int:
    """Run one command; `now` pins the clock (the tests' snapshots)."""
    try:
        args = parser().parse_args(argv)
        from hearth import estate as estates  # after parsing: --help answers without loading the tables
        estate = estates.load("qa" if args.qa else "prod", environ)
        if args.command == "logs":
            unknown = [name for name in args.apps if estate.app(name) is None]
            if unknown:
                raise HearthError(f"{', '.join(unknown)}: not an app of {estate.stage.name} (its apps: "
                                  f"{', '.join(a.name for a in estate.apps)})", EXIT_USAGE)
        if args.command == "rollback" and estate.app(args.app) is None:
            raise HearthError(f"{args.app}: not an app of {estate.stage.name} (its apps: "
                              f"{', '.join(a.name for a in estate.apps)})", EXIT_USAGE)
        cluster = Cluster(args.kubeconfig, environ)
        if args.command == "status":
            from hearth import status
            options = status.Options(args.dns_server, tuple(args.connect_to), args.timeout)
            report = status.collect(cluster, estate, options, now or datetime.datetime.now(datetime.timezone.utc))
            stdout.write(status.render_json(report) if args.json else status.render_table(report, _paint(stdout, environ)))
            return 0 if report["healthy"] else 1
        if args.command == "logs":
            from hearth import logs
            return logs.run(cluster, estate, args.apps, since=args.since, follow=not args.no_follow, out=stdout,
                            err=stderr, color=_colored(stdout, environ))
        from hearth import rollback
        return rollback.run(cluster, estate, args.app, to_revision=args.to_revision, yes=args.yes, stdin=stdin,
                            out=stdout, tty=stdout.isatty(), timeout=args.timeout, image_only=args.image_only)
    except HearthError as error:
        stderr.write(f"hearth: {' '.join(str(error).split())}\n")  # one line, whatever a library's message holds
        return error.code
    except KeyboardInterrupt:
        stderr.write("\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `hearth logs | head`: the reader left
        return 0

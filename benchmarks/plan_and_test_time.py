"""Wall time of the two everyday commands, imports included, on a warm .venv: `make plan` against the
time a fresh Python takes just to import the SDK modules that plan loads (the floor no plan can go
under; target: the plan within 1.3x of it), and `make test` exactly as the Makefile runs it (one
pytest-xdist worker per CPU; target: 60 s on 2 cores), with what makes its figure comparable: the CPUs,
the load before it started, the CPU time it used and its outcome. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/plan_and_test_time.py [--runs N] [--skip-tests] [--tests-only]
"""
import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SDKS = ("pulumi", "pulumi_aws", "pulumi_kubernetes", "pulumi_command")
TARGET_RATIO = 1.3

# Runs the plan in-process, then lists the SDK modules it loaded (submodules of pulumi_aws and
# pulumi_kubernetes load lazily: only those the program uses count).
_LIST_MODULES = f"""
import json, sys
from tools import plan
plan.main(["--stack", sys.argv[1], "--json-only"])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {SDKS!r})))
"""


def wall(command: list[str], check: bool = True) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, done.returncode


def sdk_modules(stack: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _LIST_MODULES, stack], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def median(command: list[str], runs: int) -> float:
    return statistics.median(wall(command)[0] for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--tests-only", action="store_true")
    args = parser.parse_args()
    for stack in () if args.tests_only else ("prod", "qa"):
        modules = sdk_modules(stack)
        imports = median([sys.executable, "-c", "\n".join(f"import {m}" for m in modules)], args.runs)
        plan = median(["make", "--no-print-directory", "-s", "plan", f"STACK={stack}"], args.runs)
        print(f"plan {stack}: median {plan:.2f} s over {args.runs} runs; importing its {len(modules)} SDK modules "
              f"alone: {imports:.2f} s; ratio {plan / imports:.2f} (target {TARGET_RATIO})")
    if not args.skip_tests:
        test_suite()


def test_suite() -> None:
    """One `make test`, timed from outside. The load average before it says whether the machine was quiet
    (the figure is only comparable when it was); the CPU time says how much work the suite is."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(["make", "--no-print-directory", "-s", "test"], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    tail = done.stdout.strip().splitlines()[-1:] or ["(no output)"]
    outcome = re.sub(r" in [0-9.]+s.*", "", tail[0].strip("= "))
    print(f"test suite: {seconds:.1f} s wall (target 60 s) on {os.cpu_count()} CPUs, load {load:.2f} before; "
          f"{cpu:.0f} CPU-s; {outcome}" + ("" if done.returncode == 0 else f" (make exited {done.returncode})"))


if __name__ == "__main__":
    main()

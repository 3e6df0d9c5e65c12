"""Wall time of the two everyday commands, imports included, on a warm .venv: `make plan` against the
time a fresh Python takes just to import the SDK modules that plan loads (the floor no plan can go
under; target: the plan within 1.3x of it), and `make test` (target: 60 s on 2 cores). Prints
figures; asserts nothing.

    .venv/bin/python benchmarks/plan_and_test_time.py [--runs N] [--skip-tests]
"""
import argparse
import json
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
    args = parser.parse_args()
    for stack in ("prod", "qa"):
        modules = sdk_modules(stack)
        imports = median([sys.executable, "-c", "\n".join(f"import {m}" for m in modules)], args.runs)
        plan = median(["make", "--no-print-directory", "-s", "plan", f"STACK={stack}"], args.runs)
        print(f"plan {stack}: median {plan:.2f} s over {args.runs} runs; importing its {len(modules)} SDK modules "
              f"alone: {imports:.2f} s; ratio {plan / imports:.2f} (target {TARGET_RATIO})")
    if not args.skip_tests:
        seconds, status = wall(["make", "--no-print-directory", "-s", "test"], check=False)
        print(f"test suite: {seconds:.1f} s (target 60 s)" + (" (some tests failed)" if status else ""))


if __name__ == "__main__":
    main()

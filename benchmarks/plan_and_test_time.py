"""Wall time of the two everyday commands, imports included: `make plan` (target: 3 s for prod on
2 cores) and `make test` (target: 60 s). Prints figures; asserts nothing.

    .venv/bin/python benchmarks/plan_and_test_time.py [--runs N] [--skip-tests]
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    for stack in ("prod", "qa"):
        times = [wall([sys.executable, "-m", "tools.plan", "--stack", stack]) for _ in range(args.runs)]
        print(f"plan {stack}: median {statistics.median(times):.2f} s, max {max(times):.2f} s "
              f"over {args.runs} runs (target 3 s for prod)")
    if not args.skip_tests:
        print(f"test suite: {wall([sys.executable, '-m', 'pytest', '-q']):.1f} s (target 60 s)")


if __name__ == "__main__":
    main()

"""How long `cli.py --help` takes, best and median of 10 runs on this machine (target in
../shared/TARGETS.md: < 0.5 s). A benchmark, not a test: the machine's load decides the figure."""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(runs: int = 10) -> None:
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "cli.py", "--help"], cwd=ROOT, capture_output=True, check=True, timeout=60)
        timings.append(time.perf_counter() - started)
    print(f"cli.py --help: best {min(timings):.3f} s, median {statistics.median(timings):.3f} s over {runs} runs "
          f"(target < 0.5 s)")


if __name__ == "__main__":
    main()

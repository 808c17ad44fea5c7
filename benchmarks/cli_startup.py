"""How fast the command line answers when it has no model to load: `fisedit --help`, `fisedit generate
--help` and an argument error (`fisedit generate` with no arguments), each run as a subprocess, as a
user runs it. One warm-up run each (the OS file cache), then the median of the timed runs.

    python benchmarks/cli_startup.py            # writes benchmarks/results/cli_startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "fisedit --help": (["--help"], 0),
    "fisedit generate --help": (["generate", "--help"], 0),
    "fisedit generate (argument error)": (["generate"], 2),
}


def fisedit_command() -> list[str]:
    """The installed `fisedit` script of this interpreter's environment (what a user runs), else the
    module run with this interpreter."""
    script = Path(sys.executable).with_name("fisedit")
    if script.is_file():
        return [str(script)]
    found = shutil.which("fisedit")
    return [found] if found else [sys.executable, "-m", "fisedit_ray.cli"]


def time_run(command: list[str], expected_code: int) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "100"})
    seconds = time.perf_counter() - start
    if done.returncode != expected_code:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}, not {expected_code}:\n{done.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cli_startup.json")
    args = parser.parse_args()
    base = fisedit_command()
    rows = {}
    for name, (arguments, expected_code) in CASES.items():
        for _ in range(args.warmup):
            time_run(base + arguments, expected_code)
        times = [time_run(base + arguments, expected_code) for _ in range(args.repeats)]
        rows[name] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
    result = {
        "command": base,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),  # a shared machine: how busy it was
        "cases": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    width = max(len(name) for name in rows)
    print(f"{'command':<{width}}  {'median s':>9}  {'min s':>7}  {'max s':>7}")
    for name, row in rows.items():
        print(f"{name:<{width}}  {row['median_s']:9.3f}  {row['min_s']:7.3f}  {row['max_s']:7.3f}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()

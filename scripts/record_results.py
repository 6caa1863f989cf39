"""Run bench/ scripts and keep each one's JSON line in docs/results/<name>.json.

The README and docs/ quote speed figures from these files only, and a test checks that they agree
(tests/test_docs_numbers.py). Usage, from the repository root with the venv's Python:

    python scripts/record_results.py store search          # some benches
    python scripts/record_results.py --all                 # every bench with its recorded arguments

A bench whose last stdout line is not one JSON object is an error: nothing is written for it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"

# The arguments each bench is recorded with (the defaults, unless a figure needs more).
BENCHES: dict[str, list[str]] = {
    "store": [],
    "search": [],
    "react": [],
    "engines": [],
    "learners": [],
    "lora": ["--vllm"],
    "gateway": [],
    "loop": [],
    "cluster": [],
}


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, CPython {platform.python_version()}"


def record(name: str, extra: list[str], cwd: Path = ROOT) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / f"{name}.py"), *BENCHES[name], *extra]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, text=True)
    seconds = time.monotonic() - start
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0:
        raise SystemExit(f"bench/{name}.py exited with {proc.returncode}")
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict):
        raise SystemExit(f"bench/{name}.py: last stdout line is not a JSON object: {lines[-1:]!r}")
    shown = " ".join(["python", f"bench/{name}.py", *BENCHES[name], *extra]).strip()
    doc = {
        "bench": name,
        "command": shown,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "seconds": round(seconds, 1),
        "result": result,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"benches to run, of {sorted(BENCHES)}")
    ap.add_argument("--all", action="store_true", help="run every bench")
    ap.add_argument("--extra", default="", help="more arguments for a single bench, one string")
    ap.add_argument("--cwd", type=Path, default=ROOT, help="working directory of the benches (default: the "
                    "repository; Ray workers put it on their import path)")
    args = ap.parse_args()
    names = sorted(BENCHES) if args.all else args.names
    unknown = [n for n in names if n not in BENCHES]
    if unknown or not names:
        raise SystemExit(f"name benches from {sorted(BENCHES)} (or --all); unknown: {unknown}")
    extra = args.extra.split() if args.extra else []
    if extra and len(names) != 1:
        raise SystemExit("--extra applies to one bench at a time")
    for name in names:
        doc = record(name, extra, args.cwd)
        print(f"{name}: {doc['seconds']} s -> docs/results/{name}.json", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

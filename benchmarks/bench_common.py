"""Shared helpers for the benchmark scripts: machine facts, JSON results, tables.

Kept free of TensorFlow and PyTorch imports so that each script decides which
framework its process loads.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
CORPUS_FILE = "tinyshakespeare.txt"


def cpu_model() -> str:
    """`lscpu`'s model name (falls back to /proc/cpuinfo, then platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(packages: Sequence[str] = ()) -> dict:
    """Where and when a run happened, and the versions of the packages involved."""
    return {
        "cpu": cpu_model(),
        "cores": cores(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "load_average_at_start": load_average(),
        "packages": {name: package_version(name) for name in ("deepseek-tf", *packages)},
    }


def corpus_path() -> Path:
    """The tiny Shakespeare corpus bundled with deepseek-tf, located without importing it
    (importing the package would not load TensorFlow, but this keeps the peer's process
    free of it for certain)."""
    spec = importlib.util.find_spec("deepseek_tf")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("deepseek-tf is not installed in this Python (pip install -e .)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / CORPUS_FILE
    if not path.exists():
        sys.exit(f"the bundled corpus is missing: {path}")
    return path


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def default_out(name: str) -> str:
    return str(RESULTS_DIR / f"{name}.json")


def write_json(path: str | os.PathLike, result: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path


def fmt(value, spec: str = ".3f", none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, str):
        return value
    return format(value, spec)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain fixed-width table; the first column is left-aligned, the others right."""
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        parts = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


def print_machine(info: dict) -> None:
    load = info.get("load_average_at_start")
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, {info['date']}"
        + (f", load average at start {load[0]:.2f}" if load else "")
    )

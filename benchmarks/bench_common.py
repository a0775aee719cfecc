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
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
CORPUS_FILE = "tinyshakespeare.txt"
# transformers >= 5.25 defaults to hub kernels (the `kernels` package, fetched at run time)
os.environ.setdefault("USE_HUB_KERNELS", "NO")
# cold starts stay cold: no persistent XLA cache (deepseek_tf.xla_cache) unless asked for
os.environ.setdefault("DEEPSEEK_TF_XLA_CACHE", "off")
# the few-second `tiny` / `tiny-moe` models are the test suite's presets, not shipped ones
os.environ.setdefault("DEEPSEEK_TF_PRESETS", str(BENCH_DIR.parent / "tests" / "presets"))


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


def _busy_seconds() -> float | None:
    """CPU seconds all processes on the machine have spent busy since boot (/proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class CpuMeter:
    """How much of the machine other processes used while a phase ran.

    `others_share` = (busy CPU time of the whole machine - this process's and its
    children's CPU time) / (wall time x cores): 0 on a quiet machine, 1 when other
    processes kept every core busy. Benchmarks on a shared machine report it next to
    each timing, since a contended run is not comparable with a quiet one. None for
    phases under a second (too short for the kernel's tick counts).
    """

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def start(self) -> CpuMeter:
        self._busy = _busy_seconds()
        self._own = _own_cpu_seconds()
        self._wall = time.perf_counter()
        self.result: dict = {}
        return self

    def stop(self) -> dict:
        wall = time.perf_counter() - self._wall
        busy = _busy_seconds()
        own = _own_cpu_seconds() - self._own
        share = None
        if busy is not None and self._busy is not None and wall >= 1.0:  # clock ticks: 10 ms
            others = max(busy - self._busy - own, 0.0)
            share = round(min(others / (wall * cores()), 1.0), 3)
        self.result = {
            "others_cpu_share": share,
            "own_cpu_seconds": round(own, 2),
            "wall_seconds": round(wall, 2),
        }
        return self.result


def wait_for_quiet(max_wait: float, share: float = 0.05, window: float = 10.0) -> dict:
    """Waits (at most `max_wait` s) until the whole machine's busy share over one
    `window` stays at or below `share`; returns what it saw. This process should be
    idle meanwhile (its own CPU time counts as busy)."""
    started = time.perf_counter()
    seen = None
    while True:
        before = _busy_seconds()
        time.sleep(window)
        after = _busy_seconds()
        if before is None or after is None:
            return {"waited_seconds": 0.0, "busy_share": None, "quiet": None}
        seen = round((after - before) / (window * cores()), 3)
        waited = time.perf_counter() - started
        if seen <= share or waited + window > max_wait:
            return {"waited_seconds": round(waited, 1), "busy_share": seen, "quiet": seen <= share}


def add_wait_quiet_arg(parser) -> None:
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each side's timed phase, wait up to this long for the shared machine "
        "to be quiet (<= 5%% busy over 10 s); 0: start at once",
    )


def maybe_wait_quiet(label: str, max_wait: float) -> dict | None:
    if max_wait <= 0:
        return None
    print(f"[{label}] waiting up to {max_wait:.0f} s for a quiet machine ...", flush=True)
    seen = wait_for_quiet(max_wait)
    state = "quiet" if seen["quiet"] else "still busy"
    print(
        f"[{label}] {state} after {seen['waited_seconds']:.0f} s "
        f"(busy share {fmt(seen['busy_share'], '.0%')})",
        flush=True,
    )
    return seen


def contention_note(label: str, meter_result: dict | None, limit: float = 0.1) -> str | None:
    share = (meter_result or {}).get("others_cpu_share")
    if share is None or share <= limit:
        return None
    return (
        f"warning: other processes used {share:.0%} of the machine during {label}; "
        "its timings are not representative (rerun on a quiet machine)"
    )


def finish(label: str, meter_result: dict | None, out, result: dict) -> int:
    """The end of a benchmark: the contention warning (if any), the JSON result written
    to `out`; returns 0 (the exit status)."""
    note = contention_note(label, meter_result)
    if note:
        print(note)
    print(f"wrote {write_json(out, result)}")
    return 0


def drive_scheduler(scheduler, requests: list, concurrency: int) -> dict:
    """Decodes `requests` (GenRequests) through a serving scheduler, `concurrency` in
    flight, each from its own thread: `{"tokens", "wall_s", "tokens_per_s"}`."""
    import threading

    gate, tokens, lock = threading.Semaphore(concurrency), [], threading.Lock()

    def one(req):
        with gate:
            job = scheduler.submit(req)
            while job.events.get()[1][0] not in ("end", "error"):
                pass
            with lock:
                tokens.append(len(job.tokens))

    threads = [threading.Thread(target=one, args=(r,)) for r in requests]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    return {"tokens": sum(tokens), "wall_s": wall, "tokens_per_s": sum(tokens) / wall}


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_generation() -> dict:
    """The CPU's family/model numbers and its vector extensions: lscpu's model name ("AMD
    EPYC") is the same for a Zen 3 without AVX-512 and a Zen 4 with AVX512-BF16, machines
    whose small-shape speed differs 2-3x."""
    info: dict = {}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return info
    for line in lines:
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("cpu family", "model") and key not in info:
            info[key] = value.strip()
        if key == "flags":
            wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni")
            info["flags"] = [f for f in wanted if f in value.split()]
            break
    return info


def machine_info(packages: Sequence[str] = ()) -> dict:
    """Where and when a run happened, and the versions of the packages involved."""
    return {
        "cpu": cpu_model(),
        "cpu_generation": cpu_generation(),
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


def module_missing(name: str) -> bool:
    """True when `import name` cannot work (checked without importing it)."""
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):  # e.g. sys.modules[name] is None
        return True


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
    gen = info.get("cpu_generation") or {}
    family = f" (family {gen['cpu family']} model {gen['model']})" if "model" in gen else ""
    flags = f" [{' '.join(gen.get('flags', []))}]" if gen.get("flags") else ""
    print(
        f"machine: {info['cpu']}{family}{flags}, {info['cores']} cores, {info['date']}"
        + (f", load average at start {load[0]:.2f}" if load else "")
    )

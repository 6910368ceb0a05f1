"""Load time and peak memory of the built-in data set layouts (`make bench-layouts`).

Each load runs in a fresh process (``python -c``): the process imports the loader, notes its
resident memory, loads the folder with ``load_dataset`` and reports the wall time, CPU time and
peak RSS (``ru_maxrss``) of the load. The machine's load average is recorded beside every run,
because other jobs on a shared machine inflate wall times (CPU time and memory less so).
Writes bench/results/<name>.json and <name>.md (``--name``, default ``layouts``).

    python -m bench.layouts [--data-dir=../shared/data] [--repeats=5] [--name=layouts]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = (
    "movielens-1m-implicit",
    "douban-book-music",
    "amazon-sport-cloth",
    "movielens-100k",
    "amazon-books-movies",
)

CHILD = """
import json, resource, sys, time
from pathlib import Path
from training.data.dataset import load_dataset
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0, c0 = time.perf_counter(), time.process_time()
ds = load_dataset(Path(sys.argv[1]))
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = {name: len(d) for name, d in ds.domains.items()}
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "base_kib": base, "peak_kib": peak, "rows": rows}))
"""


def run_once(folder: Path) -> dict[str, Any]:
    before = os.getloadavg()[0]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["load_avg"] = round((before + os.getloadavg()[0]) / 2, 2)
    return result


def measure(folder: Path, repeats: int) -> dict[str, Any]:
    runs = [run_once(folder) for _ in range(repeats)]
    return {
        "folder": folder.name,
        "rows": runs[0]["rows"],
        "wall_s_median": round(statistics.median(r["wall_s"] for r in runs), 3),
        "wall_s_min": round(min(r["wall_s"] for r in runs), 3),
        "cpu_s_median": round(statistics.median(r["cpu_s"] for r in runs), 3),
        "peak_rss_mib": round(max(r["peak_kib"] for r in runs) / 1024, 1),
        "import_rss_mib": round(max(r["base_kib"] for r in runs) / 1024, 1),
        "load_avg": [r["load_avg"] for r in runs],
    }


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# Built-in layouts: load time and peak memory ({meta['name']})",
        "",
        f"{meta['repeats']} fresh processes per folder, `load_dataset` only; "
        f"{meta['cpus']} CPUs, Python {meta['python']}. Peak RSS includes the imports "
        "(import RSS: before the load).",
        "",
        "| folder | rows | wall s (median / min) | CPU s (median) | peak RSS MiB | import RSS MiB "
        "| load average |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = "+".join(f"{v:,}" for v in r["rows"].values())
        avg = " ".join(f"{a:.1f}" for a in r["load_avg"])
        lines.append(
            f"| {r['folder']} | {n} | {r['wall_s_median']:.3f} / {r['wall_s_min']:.3f} "
            f"| {r['cpu_s_median']:.3f} | {r['peak_rss_mib']:.1f} | {r['import_rss_mib']:.1f} "
            f"| {avg} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--name", default="layouts")
    p.add_argument("--folders", nargs="*", default=list(FOLDERS))
    args = p.parse_args(argv)
    rows = [measure(args.data_dir / f, args.repeats) for f in args.folders]
    meta = {
        "name": args.name,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    out = ROOT / "bench" / "results"
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    text = markdown(rows, meta)
    (out / f"{args.name}.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load time and peak memory of the built-in data set layouts (`make bench-layouts`).

Each load runs in a fresh process (``python -c``): the process imports the loader, notes its
resident memory, loads the folder with ``load_dataset`` and reports the wall time, CPU time and
peak RSS (VmHWM) of the load. The machine's load average is recorded beside every run,
because other jobs on a shared machine inflate wall times (CPU time and memory less so).
Writes bench/results/<name>.json and <name>.md (``--name``, default ``layouts``).

The MovieLens-1M release (``ratings.dat``, fields separated by ``::``, which pyarrow.csv cannot
take as one delimiter) is not among the shared folders: ``--colon-rows`` writes a file of that
shape (1,000,209 rows by default, ML-1M's count; random ids, ratings and timestamps) under
``--work-dir``, loads it like the others, and times two columnar ways of parsing it in-process:
one column of lines split by ``pyarrow.compute.split_pattern`` (what the loader does), and a
streamed byte transform that replaces ``::`` by one byte before pyarrow.csv parses the stream.

    python -m bench.layouts [--data-dir=../shared/data] [--repeats=5] [--name=layouts]
        [--colon-rows=1000209] [--work-dir=/tmp/bench-layouts]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = (
    "movielens-1m-implicit",
    "douban-book-music",
    "amazon-sport-cloth",
    "movielens-100k",
    "amazon-books-movies",
)

# Peak RSS is the process's VmHWM (/proc/self/status): unlike ru_maxrss, which Linux carries over
# from the parent through fork and exec, it counts this process image only.
CHILD = """
import json, sys, time
from pathlib import Path

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

from training.data.dataset import load_dataset
base = hwm()
t0, c0 = time.perf_counter(), time.process_time()
ds = load_dataset(Path(sys.argv[1]))
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
peak = hwm()
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


def write_ratings_dat(folder: Path, rows: int, seed: int = 0) -> Path:
    """A ``ratings.dat`` shaped like MovieLens-1M's: ``user::item::rating::timestamp`` lines."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cols = [
        rng.integers(1, 6041, rows),
        rng.integers(1, 3953, rows),
        rng.integers(1, 6, rows),
        rng.integers(956703932, 1046454590, rows),
    ]
    text = pa.table({str(k): pa.array(c).cast(pa.string()) for k, c in enumerate(cols)})
    lines = pc.binary_join_element_wise(*text.columns, "::")
    with (folder / "ratings.dat").open("w", encoding="utf-8") as fh:
        fh.write("\n".join(lines.to_pylist()) + "\n")
    return folder / "ratings.dat"


def parse_split_pattern(path: Path) -> list[pa.ChunkedArray]:
    """One string column of whole lines, split on ``::`` by pyarrow.compute."""
    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=["line"], block_size=1 << 24),
        parse_options=pacsv.ParseOptions(delimiter="\x1f", quote_char=False),
        convert_options=pacsv.ConvertOptions(column_types={"line": pa.string()}),
    )
    fields = pc.split_pattern(table.column("line"), "::")
    if not pc.all(pc.equal(pc.list_value_length(fields), 4)).as_py():
        raise ValueError("a line without 4 fields")
    return [pc.list_element(fields, k) for k in range(4)]


class _Replacing(io.RawIOBase):
    """A file's bytes with every ``::`` replaced by one byte, read block by block."""

    def __init__(self, path: Path, block: int = 1 << 22) -> None:
        self._fh = path.open("rb")
        self._block, self._carry, self._out = block, b"", memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        while not self._out:
            chunk = self._fh.read(self._block)
            if not chunk:  # end of file: what was held back, then nothing
                if not self._carry:
                    return 0
                self._out, self._carry = memoryview(self._carry), b""
                break
            out = (self._carry + chunk).replace(b"::", b"\x1f")
            self._carry = b""
            if out.endswith(b":"):  # maybe the first half of a "::": held for the next block
                out, self._carry = out[:-1], b":"
            self._out = memoryview(out)
        n = min(len(buf), len(self._out))
        buf[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


def parse_byte_transform(path: Path) -> list[pa.ChunkedArray]:
    """``::`` replaced by one byte in a streamed transform, then parsed by pyarrow.csv."""
    names = ["user", "item", "rating", "timestamp"]
    with io.BufferedReader(_Replacing(path), 1 << 22) as stream:
        table = pacsv.read_csv(
            stream,
            read_options=pacsv.ReadOptions(column_names=names, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter="\x1f", quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string())),
        )
    return table.columns


def compare_colon_parsers(path: Path, repeats: int) -> list[dict[str, Any]]:
    """Wall and CPU time of both ways (best and median of ``repeats``); same columns checked."""
    ways = {"split_pattern": parse_split_pattern, "byte transform": parse_byte_transform}
    reference = parse_split_pattern(path)
    out = []
    for name, parse in ways.items():
        if not all(a.equals(b) for a, b in zip(parse(path), reference, strict=True)):
            raise AssertionError(f"{name} parses {path} differently")
        walls, cpus = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            parse(path)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        out.append(
            {
                "way": name,
                "wall_s_min": round(min(walls), 3),
                "wall_s_median": round(statistics.median(walls), 3),
                "cpu_s_median": round(statistics.median(cpus), 3),
                "load_avg": round(os.getloadavg()[0], 2),
            }
        )
    return out


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], colon: list[dict[str, Any]]) -> str:
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
    if colon:
        lines += [
            "",
            f"Parsing a `::` file of {meta['colon_rows']:,} rows into four string columns, "
            "in-process:",
            "",
            "| way | wall s (min / median) | CPU s (median) | load average |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {c['way']} | {c['wall_s_min']:.3f} / {c['wall_s_median']:.3f} "
            f"| {c['cpu_s_median']:.3f} | {c['load_avg']:.1f} |"
            for c in colon
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--name", default="layouts")
    p.add_argument("--folders", nargs="*", default=list(FOLDERS))
    p.add_argument("--colon-rows", type=int, default=1_000_209, help="0: no '::' file")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/bench-layouts"))
    args = p.parse_args(argv)
    rows = [measure(args.data_dir / f, args.repeats) for f in args.folders]
    colon: list[dict[str, Any]] = []
    if args.colon_rows:
        ratings = write_ratings_dat(args.work_dir / "ml-1m", args.colon_rows)
        rows.append(measure(ratings.parent, args.repeats))
        rows[-1]["folder"] = "ml-1m (synthetic ratings.dat)"
        colon = compare_colon_parsers(ratings, args.repeats)
    meta = {
        "name": args.name,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "colon_rows": args.colon_rows,
    }
    out = ROOT / "bench" / "results"
    result = {"meta": meta, "rows": rows, "colon_parsers": colon}
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    text = markdown(rows, meta, colon)
    (out / f"{args.name}.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

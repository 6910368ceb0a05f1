"""Data and training at scale (`make bench-scale`): for each size of synthetic data (1 M, 10 M and
100 M interactions by default, a tenth as many items, one user per 50 interactions), every stage
runs in its own process and reports wall time, throughput and the peak resident memory of that
process (``ru_maxrss`` from ``wait4``):

* ``generate``: ``python -m training.data.synthetic`` writes the two Parquet domains;
* ``load``: ``load_dataset`` reads them (dictionary-encoded ids, de-duplication);
* ``split``: load, then ``make_split`` (ratio protocol, 10 % cold-start users); its memory is
  the peak of loading and splitting together, the figure the 8 GB target is about;
* ``train-epoch``: load, split, then one epoch of ``training.trainer.fit`` on the target training
  pairs (a target-only model), configured by ``Config`` defaults and ``--set key=value``
  overrides; ``--train-pairs`` caps the pairs of the epoch (fewer steps, said in the table).
  Validation is not part of the timed epoch (the stage's validator is a constant).
* ``prepare-ray``: ``training.data.distributed.prepare`` on a local Ray instance of
  ``--ray-cpus`` CPUs (default 2) writes the prepared folder (codes partitioned by user); its
  memory is the peak of the sum of the proportional set sizes (PSS: shared object-store pages
  counted once) of the driver and every Ray process under it, sampled every 0.2 s with psutil;
  the time of loading the prepared folder back (``load_dataset``) is in the notes;
* ``prepare-ray-csv``: the same from the same rows written as CSV files (written once beside the
  Parquet data, not timed): the distributed path's text reader against its Parquet reader.

Data goes to ``--work-dir`` (default /tmp/recsys-scale), one folder per size, removed after
the size's stages unless ``--keep``. Results merge into bench/results/scale.json and scale.md
(a size run again replaces its rows), with how time and memory grow between sizes.

    python -m bench.scale [--sizes 1M,10M,100M] [--stages generate,load,split,train-epoch]
        [--set loss=bpr] [--train-pairs 100M=2000000] [--ray-cpus 2] [--work-dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
STAGES = ("generate", "load", "split", "train-epoch", "prepare-ray", "prepare-ray-csv")
DEFAULT_STAGES = STAGES[:4]  # prepare-ray[-csv] (the distributed extra) when asked for
SUFFIX = {"k": 10**3, "M": 10**6, "G": 10**9}


def parse_size(text: str) -> int:
    text = text.strip()
    if text and text[-1] in SUFFIX:
        return int(float(text[:-1]) * SUFFIX[text[-1]])
    return int(text)


def size_name(n: int) -> str:
    for suffix, k in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= k and n % k == 0:
            return f"{n // k}{suffix}"
    return str(n)


# ----------------------------------------------------------------------------- in the child


def _tree_memory(stop: threading.Event, peak: list[float]) -> None:
    """Until ``stop``: the peak over samples of the PSS (RSS where PSS is not given) summed over
    this process and all its descendants, in MiB, into ``peak[0]``, their count into ``peak[1]``,
    this process's own peak PSS into ``peak[2]``."""
    import psutil

    me = psutil.Process()
    while not stop.is_set():
        total, count = 0, 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            size = getattr(info, "pss", info.rss)
            total += size
            count += 1
            if proc is me:
                peak[2] = max(peak[2], size / 2**20)
        peak[0] = max(peak[0], total / 2**20)
        peak[1] = max(peak[1], count)
        stop.wait(0.2)


def _prepare_ray(data: Path, out: Path, cpus: int) -> dict[str, Any]:
    """The prepare-ray stage: a local Ray instance, the prepared folder, loading it back."""
    from training.data import distributed
    from training.data.dataset import load_dataset

    target = data.with_name(data.name + "-prepared")
    shutil.rmtree(target, ignore_errors=True)
    stop, peak = threading.Event(), [0.0, 0.0, 0.0]
    sampler = threading.Thread(target=_tree_memory, args=(stop, peak), daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    distributed.connect(num_cpus=cpus)
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    manifest = distributed.prepare(data, target)
    stage_s = time.perf_counter() - t0
    stop.set()
    sampler.join()
    distributed.disconnect()
    t0 = time.perf_counter()
    ds = load_dataset(target)
    load_s = time.perf_counter() - t0
    stats = [d["stats"] for d in manifest["domains"].values()]
    report = {
        "stage_s": stage_s,
        "ray_init_s": init_s,
        "ray_cpus": cpus,
        "rows": sum(s["rows"] for s in stats),
        "unique_pairs": sum(s["unique_pairs"] for s in stats),
        "stage_rows": sum(s["rows"] for s in stats),
        "users": manifest["users"],
        "partitions": manifest["partitions"],
        "peak_tree_mb": peak[0],
        "processes": int(peak[1]),
        "driver_peak_mb": peak[2],
        "load_prepared_s": load_s,
        "loaded_pairs": sum(len(d) for d in ds.domains.values()),
    }
    shutil.rmtree(target, ignore_errors=True)
    return report


def _as_csv(data: Path) -> Path:
    """The data set's Parquet domains rewritten as CSV files with a header, in a sibling folder
    (once: reused when its declaration exists)."""
    import tomllib

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    text = data.with_name(data.name + "-csv")
    if (text / "dataset.toml").is_file():
        return text
    text.mkdir(parents=True, exist_ok=True)
    decl = tomllib.loads((data / "dataset.toml").read_text(encoding="utf-8"))
    lines = [f"name = {json.dumps(decl['name'])}"]
    for domain, spec in decl["domains"].items():
        source = pq.ParquetFile(data / spec["file"])
        with pacsv.CSVWriter(text / f"{domain}.csv", source.schema_arrow) as writer:
            for batch in source.iter_batches(batch_size=1 << 20):
                writer.write_batch(batch)
        lines += [f"[domains.{domain}]", f'file = "{domain}.csv"']
    (text / "dataset.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return text


def _child(
    stage: str, data: Path, out: Path, overrides: list[str], train_pairs: int, cpus: int = 2
) -> None:
    """One stage, in this process; writes what it measured to ``out`` (JSON)."""
    import logging

    import numpy as np

    logging.basicConfig(level=logging.WARNING)
    if stage == "prepare-ray":
        out.write_text(json.dumps(_prepare_ray(data, out, cpus)))
        return
    if stage == "prepare-ray-csv":
        text = _as_csv(data)
        mb = sum(f.stat().st_size for f in text.glob("*.csv")) / 2**20
        out.write_text(json.dumps(_prepare_ray(text, out, cpus) | {"input_mb": mb}))
        return
    from training.data.dataset import load_dataset
    from training.data.splits import make_split

    report: dict[str, Any] = {}
    t0 = time.perf_counter()
    ds = load_dataset(data)
    report["load_s"] = time.perf_counter() - t0
    report["rows"] = sum(d.stats.get("rows", len(d)) for d in ds.domains.values())
    report["unique_pairs"] = sum(len(d) for d in ds.domains.values())
    report["stage_rows"] = report["rows"]
    report["stage_s"] = report["load_s"]
    if stage in ("split", "train-epoch"):
        t0 = time.perf_counter()
        split = make_split(ds, "target", "source", "ratio", None, cold_share=0.1, seed=0)
        report["split_s"] = time.perf_counter() - t0
        report["users"] = split.n_users
        report["target_items"] = split.n_target_items
        report["source_items"] = split.n_source_items
        report["train_pairs"] = len(split.train)
        report["stage_rows"] = report["unique_pairs"]
        report["stage_s"] = report["split_s"]
        del ds
    if stage == "train-epoch":
        import torch

        from training.config import load_config
        from training.trainer import Sampling, fit
        from training.transfer import new_model

        cfg = load_config(None, overrides)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        train = split.train
        if train_pairs and len(train) > train_pairs:
            pick = np.random.default_rng(0).choice(len(train), train_pairs, replace=False)
            train = train[np.sort(pick)]
        torch.manual_seed(cfg.seed)
        model = new_model(cfg, split.n_users, split.n_target_items)
        t0 = time.perf_counter()
        fit(
            model,
            train,
            lambda _model: 0.0,  # not timed: the epoch's training steps only
            epochs=1,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            loss=cfg.loss,
            reg=cfg.reg,
            temperature=cfg.temperature,
            patience=cfg.patience,
            eval_every=1,
            seed=cfg.seed,
            device=torch.device("cpu"),
            desc="bench-scale",
            progress=False,
            # the loss's negatives and the tables' optimiser as training sets them up
            sampling=Sampling(
                cfg.negative_sampler, cfg.sampled_negatives, cfg.sampler_alpha, cfg.mixed_negatives
            ),
            sparse_embeddings=cfg.sparse_embeddings,
        )
        report["epoch_s"] = time.perf_counter() - t0
        report["epoch_pairs"] = len(train)
        report["loss"] = cfg.loss
        report["sparse_embeddings"] = cfg.sparse_embeddings
        report["stage_rows"] = len(train)
        report["stage_s"] = report["epoch_s"]
    out.write_text(json.dumps(report))


# ----------------------------------------------------------------------------- in the parent


def _run(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """Run ``cmd``; (exit status, wall seconds, peak RSS in MiB of that process)."""
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024.0


def run_size(
    n: int,
    stages: list[str],
    work: Path,
    overrides: list[str],
    train_pairs: int,
    items_ratio: float,
    ray_cpus: int = 2,
) -> list[dict[str, Any]]:
    data = work / size_name(n)
    items = max(2, int(n * items_ratio))
    rows: list[dict[str, Any]] = []
    for stage in stages:
        log = work / f"{size_name(n)}-{stage}.log"
        row: dict[str, Any] = {"size": size_name(n), "interactions": n, "stage": stage}
        if stage == "generate":
            cmd = [sys.executable, "-m", "training.data.synthetic", "--interactions", str(n)]
            cmd += ["--items", str(items), "--out", str(data)]
            rc, wall, rss = _run(cmd, log)
            row |= {"stage_s": wall, "stage_rows": n, "items": items}
        else:
            if not (data / "dataset.toml").is_file():
                raise SystemExit(f"bench-scale: no data at {data}; run the generate stage first")
            out = work / f"{size_name(n)}-{stage}.json"
            cmd = [sys.executable, "-m", "bench.scale", "--child", stage, "--data", str(data)]
            cmd += ["--child-out", str(out), "--train-pairs", str(train_pairs)]
            cmd += [f"--set={o}" for o in overrides] + ["--ray-cpus", str(ray_cpus)]
            rc, wall, rss = _run(cmd, log)
            if rc == 0:
                row |= json.loads(out.read_text())
        row |= {"rc": rc, "process_s": wall, "peak_rss_mb": rss}
        if "peak_tree_mb" in row:  # the driver and its Ray processes together
            row |= {"driver_rss_mb": rss, "peak_rss_mb": row["peak_tree_mb"]}
        if rc != 0:
            tail = log.read_text()[-2000:]
            row["error"] = tail.strip().splitlines()[-1] if tail.strip() else f"exit {rc}"
        row["rows_per_s"] = row["stage_rows"] / row["stage_s"] if row.get("stage_s") else None
        print(json.dumps(row), flush=True)  # noqa: T201 - the benchmark's progress
        rows.append(row)
        if rc != 0:
            break
    return rows


def growth(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each stage and consecutive pair of sizes: factors of time and memory, and the exponent
    k of time ~ size^k."""
    out = []
    for stage in STAGES:
        done = sorted(
            (r for r in rows if r["stage"] == stage and r.get("rc") == 0 and r.get("stage_s")),
            key=lambda r: r["interactions"],
        )
        for a, b in zip(done, done[1:], strict=False):
            size = b["stage_rows"] / a["stage_rows"]
            t = b["stage_s"] / a["stage_s"]
            out.append(
                {
                    "stage": stage,
                    "from": a["size"],
                    "to": b["size"],
                    "rows_x": size,
                    "time_x": t,
                    "memory_x": b["peak_rss_mb"] / a["peak_rss_mb"],
                    "time_exponent": math.log(t) / math.log(size) if size > 1 else None,
                }
            )
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# bench-scale: data and training at scale",
        "",
        "`make bench-scale` (bench/scale.py): synthetic two-domain data (training/data/synthetic.py,"
        " Parquet, power-law item popularity, 30 % of the rows and items in the target domain), "
        "every stage in its own process. Time: the stage itself (generate: the whole process); "
        "rows/s over the stage's rows (generate and load: rows read or written; split: unique "
        "pairs; train-epoch: training pairs of the epoch); memory: peak RSS of the stage's "
        "process (split and train-epoch include loading; train-epoch includes the split; "
        "prepare-ray: the driver and its Ray processes together, see the notes).",
        "",
        f"Machine: {result['machine']}. Train-epoch configuration: "
        f"`{' '.join(result['overrides']) or 'Config defaults'}`.",
        "",
        "| size | stage | time (s) | rows/s | peak memory (MiB) | notes |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in sorted(result["rows"], key=lambda r: (r["interactions"], STAGES.index(r["stage"]))):
        notes = []
        if r.get("rc"):
            notes.append(f"FAILED: {r.get('error', '')}")
        if r["stage"] == "generate":
            notes.append(f"{r.get('items', 0):,} items")
        if r["stage"] == "load" and r.get("unique_pairs"):
            notes.append(f"{r['unique_pairs']:,} unique pairs")
        if r["stage"] == "split" and r.get("users"):
            notes.append(
                f"{r['users']:,} users, {r['target_items']:,} + {r['source_items']:,} items, "
                f"{r['train_pairs']:,} target train pairs; load {r['load_s']:.1f} s"
            )
        if r["stage"] == "train-epoch" and r.get("epoch_pairs"):
            part = "" if r["epoch_pairs"] == r["train_pairs"] else " (capped: fewer steps)"
            notes.append(
                f"loss {r['loss']}{', sparse tables' if r.get('sparse_embeddings') else ''}, "
                f"{r['epoch_pairs']:,} of {r['train_pairs']:,} pairs{part}"
            )
        if r["stage"] == "prepare-ray-csv" and r.get("input_mb"):
            notes.append(f"from {r['input_mb']:,.1f} MiB of CSV")
        if r["stage"].startswith("prepare-ray") and r.get("partitions"):
            notes.append(
                f"Ray Data on {r['ray_cpus']} CPU{'s' if r['ray_cpus'] > 1 else ''} (+{r['ray_init_s']:.1f} s to start Ray), "
                f"{r['partitions']} user partitions, {r['unique_pairs']:,} unique pairs; memory: "
                f"driver + {r['processes'] - 1} Ray processes (PSS sum), the driver alone "
                f"{r['driver_peak_mb']:,.0f} MiB; loading the prepared folder back "
                f"{r['load_prepared_s']:.1f} s (peak RSS {r['driver_rss_mb']:,.0f} MiB)"
            )
        t = r.get("stage_s")
        rate = r.get("rows_per_s")
        lines.append(
            f"| {r['size']} | {r['stage']} | {t:.1f} | {rate:,.0f} | {r['peak_rss_mb']:,.0f} | "
            f"{'; '.join(notes)} |"
            if t and rate
            else f"| {r['size']} | {r['stage']} | - | - | {r['peak_rss_mb']:,.0f} | "
            f"{'; '.join(notes)} |"
        )
    lines += [
        "",
        "How each stage grows (consecutive sizes; exponent k of time ~ rows^k):",
        "",
        "| stage | sizes | rows x | time x | memory x | k |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for g in result["growth"]:
        k = "-" if g["time_exponent"] is None else f"{g['time_exponent']:.2f}"
        lines.append(
            f"| {g['stage']} | {g['from']} -> {g['to']} | {g['rows_x']:.1f} | "
            f"{g['time_x']:.1f} | {g['memory_x']:.1f} | {k} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1M,10M,100M", help="interactions per size, e.g. 1M,10M")
    p.add_argument(
        "--stages",
        default=",".join(DEFAULT_STAGES),
        help=f"any of {', '.join(STAGES)} (default: all but prepare-ray)",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--train-pairs",
        default="",
        help="cap of the train-epoch pairs, for all sizes (N) or per size (100M=2M,...)",
    )
    p.add_argument("--items-ratio", type=float, default=0.1, help="items per interaction")
    p.add_argument("--ray-cpus", type=int, default=2, help="CPUs of prepare-ray's Ray instance")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "recsys-scale")
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument(
        "--merge", type=Path, action="append", default=[], help="also take the rows of this JSON"
    )
    p.add_argument(
        "--child", choices=[s for s in STAGES if s != "generate"], help=argparse.SUPPRESS
    )
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(
            args.child,
            args.data,
            args.child_out,
            args.overrides,
            int(args.train_pairs or 0),
            args.ray_cpus,
        )
        return 0
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
        caps: dict[int, int] = {}
        for part in filter(None, (s.strip() for s in args.train_pairs.split(","))):
            key, sep, value = part.partition("=")
            if sep:
                caps[parse_size(key)] = parse_size(value)
            else:
                caps |= {n: parse_size(key) for n in sizes}
    except ValueError as exc:
        p.error(f"--sizes/--train-pairs: {exc}")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"--stages: unknown {', '.join(unknown)}; known: {', '.join(STAGES)}")
    if ROOT in args.work_dir.resolve().parents or args.work_dir.resolve() == ROOT:
        p.error("--work-dir must be outside the repository")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for n in sizes:
        rows += run_size(
            n,
            stages,
            args.work_dir,
            args.overrides,
            caps.get(n, 0),
            args.items_ratio,
            args.ray_cpus,
        )
        if not args.keep and "generate" in stages:
            shutil.rmtree(args.work_dir / size_name(n), ignore_errors=True)
            shutil.rmtree(args.work_dir / f"{size_name(n)}-csv", ignore_errors=True)
    for other in args.merge:  # rows of another run (its own --results), taken as they are
        rows += json.loads(other.read_text())["rows"]
    rows = list({(r["size"], r["stage"]): r for r in rows}.values())  # the last of each wins
    json_path = args.results / "scale.json"  # read now: another run may have written meanwhile
    previous = json.loads(json_path.read_text()) if json_path.is_file() else {"rows": []}
    done = {(r["size"], r["stage"]) for r in rows}
    merged = [r for r in previous["rows"] if (r["size"], r["stage"]) not in done] + rows
    load = os.getloadavg()
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average "
        f"{load[0]:.1f} at the end of the last run (shared)",
        "overrides": args.overrides or previous.get("overrides", []),
        "rows": merged,
        "growth": growth(merged),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    (args.results / "scale.md").write_text(markdown(result))
    return 1 if any(r.get("rc") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Row-sharded against replicated embedding tables under torchrun (``make bench-train-shard``):
memory per process and one epoch's wall time on a synthetic catalogue.

Each case is one ``torchrun --nproc-per-node=N`` run of the training loop of
``training.trainer`` (its batches, losses, optimisers, ``training.sharding`` and the feed by
which rank 0, the only process holding the data, sends every rank its slice of each step) on the
in-memory generator ``training.data.synthetic.synthetic_pairs``: ``off`` wraps the model in
DistributedDataParallel (whole tables in every process), ``rows`` shards every table by rows.
Every process reports its peak RSS, its RSS after the epoch and the bytes of the parameters and
optimiser moments it holds. A case runs the steps that fit in ``--budget`` seconds and the epoch
time is extrapolated from the mean step time when the epoch did not end (marked as such).
Results: bench/results/train_shard.{json,md}.

    python -m bench.train_shard                                    # the default table
    python -m bench.train_shard --items 100000 --interactions 200000 --budget 10   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _case(spec: dict[str, Any], out: Path) -> None:
    """One process of one case (under torchrun); rank 0 writes every process's figures."""
    import torch
    from torch import distributed as dist
    from torch import nn

    from training.data.synthetic import synthetic_pairs
    from training.model import TwoTower
    from training.sharding import shard_tables
    from training.trainer import (
        Sampling,
        _Batches,
        _Feed,
        _Optimizer,
        _set_sparse,
        init_distributed,
        train_epoch,
    )

    torch.set_num_threads(spec["threads"])
    rank, world_size = init_distributed(torch.device("cpu"))
    # only rank 0 holds the data, as in training.trainer.fit: it cuts every step for the others
    train = (
        synthetic_pairs(spec["users"], spec["items"], spec["interactions"], seed=0)
        if rank == 0
        else None
    )
    torch.manual_seed(0)
    model = TwoTower(spec["users"], spec["items"], spec["dim"])
    sharded = spec["shard"] == "rows"
    if sharded:
        shard_tables(model, rank, world_size)
    opt = _Optimizer(model, 0.005, {}, _set_sparse(model, spec["sparse"]), sum_dense=sharded)
    net: nn.Module = model if sharded else nn.parallel.DistributedDataParallel(model)
    sampling = Sampling("popularity", spec["negatives"])
    held = None
    n_steps_epoch = 0
    if train is not None:
        held = _Batches(train, spec["loss"], spec["batch_size"], spec["items"], None, sampling)
        n_steps_epoch = -(-held.units.numel() // held.step)
    batches = _Feed(held, spec["items"])
    model.train()
    dist.barrier()
    t0 = time.perf_counter()
    _, steps = train_epoch(
        net,
        opt,
        batches,
        torch.Generator().manual_seed(1),
        torch.device("cpu"),
        loss=spec["loss"],
        reg=0.05,
        temperature=1.0,
        max_seconds=spec["budget"],
    )
    wall = time.perf_counter() - t0
    moments = sum(
        t.numel() * t.element_size()
        for o in opt.opts
        for state in o.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )
    mine = {
        "rank": rank,
        "steps": steps,
        "measured_s": wall,
        "table_rows": int(model.item_emb.weight.shape[0]),
        "parameters_mb": sum(p.numel() * 4 for p in model.parameters()) / 2**20,
        "moments_mb": moments / 2**20,
        "rss_after_mb": _rss_mb(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    every: list[dict[str, Any]] = [{} for _ in range(world_size)]
    dist.all_gather_object(every, mine)
    if rank == 0:
        steps = min(p["steps"] for p in every)
        wall = max(p["measured_s"] for p in every)
        complete = steps >= n_steps_epoch
        result = {
            "steps": steps,
            "steps_per_epoch": n_steps_epoch,
            "complete": complete,
            "epoch_s": wall if complete else wall / steps * n_steps_epoch,
            "processes": every,
        }
        out.write_text(json.dumps(result))
    dist.destroy_process_group()


CASES = (  # (label, shard, sparse tables)
    ("replicated (DDP), sparse tables + SparseAdam", "off", True),
    ("row-sharded, sparse tables + SparseAdam", "rows", True),
    ("replicated (DDP), Adam", "off", False),
    ("row-sharded, Adam", "rows", False),
)


def markdown(res: dict[str, Any]) -> str:
    a = res["args"]
    lines = [
        "# Row-sharded against replicated embedding tables under torchrun",
        "",
        f"Generated by `bench/train_shard.py` (`make bench-train-shard`) on {res['host']}, "
        f"{a['processes']} processes x {a['threads']} torch thread(s), gloo on CPU (the machine "
        f"shared with other jobs: times are upper bounds). {a['interactions']:,} synthetic "
        f"interactions (`training.data.synthetic.synthetic_pairs`), {a['users']:,} users, "
        f"{a['items']:,} items, dim {a['dim']} (+1 for the item bias), batch "
        f"{a['batch_size']:,} pairs, sampled softmax with {a['negatives']} popularity negatives. "
        f"A case whose {a['budget']:.0f} s budget ended before the epoch did reports the epoch "
        "time extrapolated from its mean step time. Only rank 0 holds the pairs; it sends every "
        "rank its slice of each step (training.trainer's feed). Memory per process: peak RSS "
        "(the model as built, whole, before sharding, and rank 0's data included), RSS after "
        "the epoch, and the "
        "parameters and optimiser moments that process holds.",
        "",
        "| case | item rows per process | epoch s | measured | peak RSS MB | RSS after MB | "
        "parameters + moments MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["cases"]:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} | | | | | |")
            continue
        ps = r["processes"]
        measured = (
            "whole epoch"
            if r["complete"]
            else f"{r['steps']} of {r['steps_per_epoch']} steps in "
            f"{max(p['measured_s'] for p in ps):.0f} s"
        )

        def each(key: str, ps: list[dict[str, Any]] = ps) -> str:
            return " / ".join(f"{p[key]:,.0f}" for p in ps)

        state = " / ".join(f"{p['parameters_mb'] + p['moments_mb']:,.0f}" for p in ps)
        lines.append(
            f"| {r['label']} | {each('table_rows')} | {r['epoch_s']:,.0f} | {measured} | "
            f"{each('peak_rss_mb')} | {each('rss_after_mb')} | {state} |"
        )
    lines += ["", f"Command: `{res['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--interactions", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--negatives", type=int, default=1024)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--budget", type=float, default=60.0, help="seconds of steps per case")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one process of one case
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        _case(json.loads(args.one), args.result)
        return 0
    cases: list[dict[str, Any]] = []
    for label, shard, sparse in CASES:
        spec = {
            "users": args.users,
            "items": args.items,
            "interactions": args.interactions,
            "dim": args.dim,
            "batch_size": args.batch_size,
            "negatives": args.negatives,
            "loss": "sampled_softmax",
            "shard": shard,
            "sparse": sparse,
            "threads": args.threads,
            "budget": args.budget,
        }
        print(f"{label} ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            result_path = Path(tmp) / "result.json"
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    f"--nproc-per-node={args.processes}",
                    "-m",
                    "bench.train_shard",
                    "--one",
                    json.dumps(spec),
                    "--result",
                    str(result_path),
                ],
                cwd=ROOT,
                env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)),
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0 or not result_path.is_file():
                tail = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                result: dict[str, Any] = {"error": tail}
            else:
                result = json.loads(result_path.read_text())
        row = {"label": label, **spec, **result}
        print(f"  {json.dumps(result)}", flush=True)
        cases.append(row)
    res = {
        "host": f"{platform.node()} ({os.cpu_count()} CPUs visible)",
        "args": {**vars(args), "out": str(args.out)},
        "command": " ".join(
            ["python -m bench.train_shard", *(sys.argv[1:] if argv is None else argv)]
        ),
        "cases": cases,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_shard.json").write_text(json.dumps(res, indent=1, default=str))
    (args.out / "train_shard.md").write_text(markdown(res))
    print((args.out / "train_shard.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Two CPU processes under torchrun (gloo) train the same model as one: under
DistributedDataParallel (whole tables in every process) and with row-sharded tables; only rank 0
reads the data set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.data.synthetic import ScaleSpec, write_synthetic

REPO_ROOT = Path(__file__).resolve().parents[2]
ARGS = [
    "train",
    "--config",
    str(REPO_ROOT / "training" / "configs" / "synthetic.toml"),
    "--threads=1",
    "--strategies=finetune",
    "--cold_shares=0.2",
    "--epochs=6",
    "--source_epochs=6",
    "--patience=100",
    # what DDP changes is the training step: no baselines, blend or learned ranker to wait for
    "--baselines=popularity",
    "--blend=false",
    "--ranker=dot",
    "--log-level",
    "WARNING",
]


# two processes on this machine
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _train_one_and_two(tmp_path: Path, extra: list[str]) -> tuple[Path, Path]:
    """Run directories of the same training in one process and in two under torchrun (side by
    side: each process has one thread)."""
    single, double = tmp_path / "one", tmp_path / "two"
    one = subprocess.Popen(
        [sys.executable, "-m", "training", *ARGS, *extra, "--run-dir", str(single)],
        env=_env(),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        proc = subprocess.run(
            [
                *TORCHRUN,
                "-m",
                "training",
                *ARGS,
                *extra,
                "--run-dir",
                str(double),
            ],
            env=_env(),
            cwd=REPO_ROOT,
            timeout=120,
            capture_output=True,
            text=True,
        )
        _, one_err = one.communicate(timeout=120)
    finally:
        one.kill()
    assert one.returncode == 0, one_err[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((double / "results.json").read_text())["world_size"] == 2
    assert json.loads((single / "results.json").read_text())["world_size"] == 1
    return single, double


def _same_tables(single: Path, double: Path) -> None:
    a = torch.load(single / "checkpoint.pt", weights_only=False)
    b = torch.load(double / "checkpoint.pt", weights_only=False)
    assert a["strategy"] == b["strategy"]
    torch.testing.assert_close(b["item_table"], a["item_table"], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(b["user_table"], a["user_table"], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss",
    [
        [],  # the full softmax (the default)
        # shared sampled negatives and sparse tables: every process draws the global batch's
        ["--loss=sampled_softmax", "--sampled-negatives=64", "--sparse-embeddings=true"],
        ["--loss=sampled_softmax", "--negative-sampler=uniform", "--mixed-negatives=true"],
    ],
    ids=["softmax", "sampled-sparse", "mixed"],
)
def test_two_process_ddp_matches_one_process(tmp_path: Path, loss: list[str]) -> None:
    single, double = _train_one_and_two(tmp_path, loss)
    _same_tables(single, double)


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss",
    [
        ["--loss=sampled_softmax", "--sampled-negatives=64", "--sparse-embeddings=true"],
        ["--loss=bpr"],  # dense gradients of the shards, Adam
    ],
    ids=["sampled-sparse", "bpr"],
)
def test_two_process_row_sharding_matches_one_process(tmp_path: Path, loss: list[str]) -> None:
    """Each process holds half the rows of every table and the metrics are one process's."""
    extra = [*loss, "--shard-embeddings=rows", "--export-strategy=finetune"]
    single, double = _train_one_and_two(tmp_path, [*extra, "--allow-below-popularity=true"])
    _same_tables(single, double)
    one = json.loads((single / "results.json").read_text())["shares"]["0.2"]
    two = json.loads((double / "results.json").read_text())["shares"]["0.2"]
    for name in ("target_only", "finetune", "exported"):
        for seg in ("warm", "cold"):
            for metric in ("ndcg@10", "recall@10"):
                assert two["strategies"][name][seg][metric] == pytest.approx(
                    one["strategies"][name][seg][metric], rel=1e-3, abs=1e-4
                ), (name, seg, metric)
    n_users, n_items = two["split"]["users"], two["split"]["target_items"]
    for name in ("target_only", "finetune"):
        assert "shard_rows" not in one["strategies"][name]["train"]
        train = two["strategies"][name]["train"]
        assert train["valid_ndcg@10"] == pytest.approx(
            one["strategies"][name]["train"]["valid_ndcg@10"], rel=1e-3, abs=1e-4
        )
        # the row count of each process's own parameter, reported by that process
        assert train["shard_rows"] == {
            "user_emb.weight": [-(-n_users // 2), n_users // 2],
            "item_emb.weight": [-(-n_items // 2), n_items // 2],
            "item_bias.weight": [-(-n_items // 2), n_items // 2],
        }


@pytest.mark.slow
def test_workers_train_without_reading_the_data_set(tmp_path: Path) -> None:
    """Rank 1 is handed a data folder that does not exist: the run still trains and publishes,
    rank 1 having trained every fit on the slices of each batch that rank 0 sent it."""
    data = tmp_path / "data"
    write_synthetic(ScaleSpec(interactions=30_000, items=600, seed=0), data / "scale")
    launcher = tmp_path / "launch.sh"
    launcher.write_text(
        "#!/bin/sh\n"
        f'if [ "$RANK" != 0 ]; then set -- "$@" --data-dir={tmp_path / "absent"}; fi\n'
        f'exec {sys.executable} -m training "$@"\n'
    )
    launcher.chmod(0o755)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            *TORCHRUN,
            "--no-python",
            str(launcher),
            *ARGS,
            "--dataset=scale",
            f"--data-dir={data}",
            "--loss=sampled_softmax",
            "--sampled-negatives=64",
            "--allow-below-popularity=true",
            "--run-dir",
            str(run_dir),
            "--repository",
            str(tmp_path / "repo"),
        ],
        env=_env(),
        cwd=REPO_ROOT,
        timeout=180,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert "published" in results
    ranks = results["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    worker = ranks[1]
    assert worker["fits"] == 3  # the source model, target_only, finetune
    # the two target fits ran 6 epochs each (patience 100) over the split's training pairs,
    # rank 1 taking the odd positions of every batch of 512; the source fit came on top
    train = results["shares"]["0.2"]["split"]["train"]
    batches = -(-train // 512)
    assert worker["pairs"] > 2 * 6 * (train // 2 - batches)
    assert worker["steps"] > 2 * 6 * batches

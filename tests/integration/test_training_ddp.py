"""DistributedDataParallel: two CPU processes under torchrun (gloo) train the same model as one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    "--log-level",
    "WARNING",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    return env


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
    single, double = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, "-m", "training", *ARGS, *loss, "--run-dir", str(single)],
        check=True,
        env=_env(),
        cwd=REPO_ROOT,
        timeout=120,
        capture_output=True,
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "training",
            *ARGS,
            *loss,
            "--run-dir",
            str(double),
        ],
        env=_env(),
        cwd=REPO_ROOT,
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(single / "checkpoint.pt", weights_only=False)
    b = torch.load(double / "checkpoint.pt", weights_only=False)
    assert a["strategy"] == b["strategy"]
    torch.testing.assert_close(b["item_table"], a["item_table"], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(b["user_table"], a["user_table"], rtol=1e-3, atol=1e-4)
    assert json.loads((double / "results.json").read_text())["world_size"] == 2
    assert json.loads((single / "results.json").read_text())["world_size"] == 1

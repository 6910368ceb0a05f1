"""`make demo` end to end, with the synthetic configuration: it trains, publishes, serves and
recommends, and says so in its output."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.processes import REPO_ROOT, project_env

pytestmark = pytest.mark.e2e


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "devtools.demo",
            "--config=training/configs/synthetic.toml",
            f"--workdir={tmp_path / 'demo'}",
            "--k=5",
        ],
        cwd=REPO_ROOT,
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    # Every step announced, in order.
    steps = re.findall(r"==> \[(\d)/6\]", out)
    assert steps == ["1", "2", "3", "4", "5", "6"]
    # The evaluation table puts the transfer strategies beside both baselines.
    for row in ("| popularity |", "| target_only |", "| finetune |", "| shared_private |"):
        assert row in out, row
    assert re.search(
        r"Published models: target-ranker, target-retrieval, target-dot-ranker version \d+", out
    )
    assert "learned ranker over 13 features of target-retrieval" in out
    for service in ("serving.retrieval", "serving.ranking", "gateway"):
        assert re.search(rf"{re.escape(service)}\s+SERVING on 127\.0\.0\.1:\d+", out), service
        assert re.search(rf"{re.escape(service)}\s+exited with 0", out), service
    # A warm user gets nearest neighbours and item-to-item neighbours, a cold-start user
    # transferred recommendations; each row shows its place before ranking and its sources.
    warm = out.split("Warm user")[1].split("Cold-start user")[0]
    cold = out.split("Cold-start user")[1].split("==> [5/6]")[0]
    row = r"^\s+\d+\s+(\d+)\s+-?\d+\.\d{3}\s+([a-z0-9+]+)\s"
    warm_rows, cold_rows = re.findall(row, warm, re.M), re.findall(row, cold, re.M)
    assert len(warm_rows) == 5 == len(cold_rows)
    assert any("ann" in sources.split("+") for _, sources in warm_rows)
    assert not any("transfer" in sources for _, sources in warm_rows)
    assert any("transfer" in sources.split("+") for _, sources in cold_rows)
    assert "items up from below retrieval's top 5" in warm
    assert "DEGRADED" not in out
    assert 'grpc_method="Recommend"' in out
    assert re.search(r'recsys_ranker_model_loaded\{.*provider="cpu".*\} 1\.0', out)
    assert "Demo finished" in out

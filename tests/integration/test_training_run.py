"""End to end on the synthetic generator: transfer beats target-only, export parity, publishing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort
import pytest
import torch

from recsys.repository import (
    RANKER_SIGNATURE,
    list_versions,
    read_metadata,
    triton_config,
    user_tower_signature,
    verify_version,
)
from training.cli import main
from training.config import load_config
from training.export_onnx import ExportError, TableTower, _export, check_graph, publish
from training.run import run

REPO_ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC = REPO_ROOT / "training" / "configs" / "synthetic.toml"


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("synthetic")
    cfg = load_config(SYNTHETIC, ["--threads=1", "--cold_shares=0.2"])
    results = run(cfg, None, base / "run", base / "repo")
    return {"results": results, "run_dir": base / "run", "repo": base / "repo"}


def _ndcg(block: dict[str, Any], name: str, segment: str) -> float:
    return float(block["strategies"][name][segment]["ndcg@10"])


def test_transfer_beats_target_only_on_planted_tastes(synthetic_run: dict[str, Any]) -> None:
    block = synthetic_run["results"]["shares"]["0.2"]
    transfer = ["finetune", "freeze_unfreeze", "shared_private"]
    best_warm = max(_ndcg(block, s, "warm") for s in transfer)
    assert best_warm > 1.3 * _ndcg(block, "target_only", "warm")
    best_cold = max(_ndcg(block, s, "cold") for s in transfer + [f"{s}+emcdr" for s in transfer])
    assert best_cold > 1.3 * _ndcg(block, "target_only", "cold")
    assert best_cold > 1.3 * _ndcg(block, "popularity", "cold")
    # the EMCDR mapping alone turns a target-only model into a useful cold-start model
    assert _ndcg(block, "target_only+emcdr", "cold") > _ndcg(block, "target_only", "cold")


def test_run_writes_report_checkpoint_and_split(synthetic_run: dict[str, Any]) -> None:
    run_dir: Path = synthetic_run["run_dir"]
    for name in ("results.json", "results.md", "results.png", "checkpoint.pt"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "split-cold0.2" / "split.npz").is_file()
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["config"]["seed"] == 0 and ckpt["config"]["dataset"] == "synthetic"
    assert "| popularity |" in (run_dir / "results.md").read_text()


def test_published_models_match_the_checkpoint(synthetic_run: dict[str, Any]) -> None:
    repo: Path = synthetic_run["repo"]
    ckpt = torch.load(synthetic_run["run_dir"] / "checkpoint.pt", weights_only=False)
    assert list_versions(repo, "target-ranker") == [1] == list_versions(repo, "target-retrieval")
    # The learned ranker is target-ranker (tests/integration/test_second_stage.py); the
    # dot-product graph of the towers is published beside it.
    ranker_dir, retrieval_dir = repo / "target-dot-ranker" / "1", repo / "target-retrieval" / "1"
    for d in (ranker_dir, retrieval_dir):
        meta = verify_version(d)
        for key in (
            "name",
            "version",
            "kind",
            "domain",
            "source_domain",
            "inputs",
            "outputs",
            "opset",
            "embedding_dim",
            "dataset",
            "strategy",
            "metrics",
            "created_at",
            "code_version",
            "files",
        ):
            assert key in meta, key
        assert (d.parent / "config.pbtxt").is_file()
    # Training writes the one config.pbtxt the tests publish too.
    assert (ranker_dir / "config.pbtxt").read_text() == triton_config(
        "target-dot-ranker", RANKER_SIGNATURE
    )
    dim = int(ckpt["user_table"].shape[1])
    assert (retrieval_dir / "config.pbtxt").read_text() == triton_config(
        "target-retrieval", user_tower_signature(dim)
    )
    meta = read_metadata(retrieval_dir)
    assert meta["inputs"] == [{"name": "user_index", "datatype": "INT64", "shape": [-1]}]
    users = json.loads((retrieval_dir / "users.json").read_text())
    items = json.loads((ranker_dir / "items.json").read_text())
    assert set(users["kinds"]) == {"target", "mapped"}
    assert len(users["ids"]) == len(users["kinds"]) == ckpt["user_table"].shape[0]
    assert len(items["ids"]) == len(items["titles"]) == len(items["popularity"])
    user_table = ckpt["user_table"].numpy()
    item_table = ckpt["item_table"].numpy()

    rng = np.random.default_rng(1)
    u = rng.integers(0, user_table.shape[0], 500).astype(np.int64)
    i = rng.integers(0, item_table.shape[0], 500).astype(np.int64)
    mapped = np.array([k == "mapped" for k in users["kinds"]])
    u[:10] = np.flatnonzero(mapped)[:10]  # include mapped (cold-start) users
    score = ort.InferenceSession(str(ranker_dir / "model.onnx")).run(
        None, {"user_index": u, "item_index": i}
    )[0]
    want = (user_table[u] * item_table[i]).sum(1)
    np.testing.assert_allclose(score, want, rtol=1e-5, atol=1e-6)
    emb = ort.InferenceSession(str(retrieval_dir / "model.onnx")).run(None, {"user_index": u})[0]
    np.testing.assert_allclose(emb, user_table[u], rtol=1e-6)
    item_emb = ort.InferenceSession(str(retrieval_dir / "item_tower.onnx")).run(
        None, {"item_index": i}
    )[0]
    np.testing.assert_allclose(item_emb, item_table[i], rtol=1e-6)
    np.testing.assert_array_equal(np.load(retrieval_dir / "item_embeddings.npy"), item_table)
    # The index is built at publish, over these embeddings, of the type the catalogue size picks.
    index_meta = json.loads((retrieval_dir / "metadata.json").read_text())["index"]
    assert index_meta["kind"] == "flat" and index_meta["ntotal"] == item_table.shape[0]
    stored = faiss.read_index(str(retrieval_dir / "items.faiss"))
    assert stored.ntotal == item_table.shape[0] and stored.d == item_table.shape[1]
    seen = np.load(retrieval_dir / "seen.npz")
    assert seen["indptr"].shape == (user_table.shape[0] + 1,)
    assert np.all(np.diff(seen["indptr"])[mapped] == 0)  # mapped users have no target history
    # retrieval by inner product ranks the same as the ranker scores
    top_user = int(np.flatnonzero(~mapped)[0])
    full = item_table @ user_table[top_user]
    ranker_all = ort.InferenceSession(str(ranker_dir / "model.onnx")).run(
        None,
        {
            "user_index": np.full(item_table.shape[0], top_user, dtype=np.int64),
            "item_index": np.arange(item_table.shape[0], dtype=np.int64),
        },
    )[0]
    assert np.argmax(full) == np.argmax(ranker_all)


def test_the_int8_ranker_is_checked_and_recorded(synthetic_run: dict[str, Any]) -> None:
    """Beside the fp32 graph, the quantised one where it ranks like fp32; metadata.json lists
    the graphs and the comparison either way, and the listed files are hashed like the rest. The
    dot-product graph is published as the dot ranker beside the learned ranker."""
    ranker_dir = synthetic_run["repo"] / "target-dot-ranker" / "1"
    meta = verify_version(ranker_dir)
    check = meta["int8_check"]
    assert check["method"].startswith("weight-only")  # the dot-product ranker: 8-bit tables
    assert check["users"] > 0 and 0 < check["spearman_min"] <= check["spearman_mean"] <= 1
    assert check["passed"] == (
        check["spearman_mean"] >= 0.999 and check["top10_agreement_mean"] >= 0.99
    )
    expected = {"fp32": "model.onnx"} | ({"int8": "model.int8.onnx"} if check["passed"] else {})
    assert meta["graphs"] == expected
    assert ("model.int8.onnx" in meta["files"]) == check["passed"]
    if check["passed"]:
        u = np.arange(50, dtype=np.int64) % meta["n_users"]
        i = np.arange(50, dtype=np.int64) % meta["n_items"]
        feeds = {"user_index": u, "item_index": i}
        fp32 = ort.InferenceSession(str(ranker_dir / "model.onnx")).run(None, feeds)[0]
        int8 = ort.InferenceSession(str(ranker_dir / "model.int8.onnx")).run(None, feeds)[0]
        assert np.corrcoef(fp32, int8)[0, 1] > 0.99


def test_export_from_checkpoint_alone_adds_a_version(
    synthetic_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = synthetic_run["run_dir"] / "checkpoint.pt"
    repo = tmp_path / "repo"
    assert main(["export", str(ckpt), "--repository", str(repo)]) == 0
    assert main(["export", str(ckpt), "--repository", str(repo)]) == 0
    assert list_versions(repo, "target-ranker") == [1, 2] == list_versions(repo, "target-retrieval")
    assert capsys.readouterr().out.strip().endswith("target-ranker, target-retrieval version 2")


def test_failed_check_publishes_nothing(synthetic_run: dict[str, Any], tmp_path: Path) -> None:
    ckpt = torch.load(synthetic_run["run_dir"] / "checkpoint.pt", weights_only=False)
    ckpt["item_table"] = ckpt["item_table"].clone()
    ckpt["item_table"][0, 0] = float("nan")
    repo = tmp_path / "repo"
    with pytest.raises(ExportError, match="non-finite"):
        publish(ckpt, repo)
    assert not repo.exists() or not any(p for p in repo.rglob("*") if p.is_file())


def test_parity_check_rejects_a_graph_that_differs(tmp_path: Path) -> None:
    table = torch.randn(20, 4)
    path = tmp_path / "t.onnx"
    _export(TableTower(table), (torch.tensor([0, 1]),), ["user_index"], ["user_embedding"], path)
    feeds = {"user_index": np.arange(20, dtype=np.int64)}
    assert check_graph(path, TableTower(table), feeds) <= 1e-6
    other = table.clone()
    other[3, 2] *= 1.001
    with pytest.raises(ExportError, match="relative error"):
        check_graph(path, TableTower(other), feeds)


def test_cli_errors_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('dataset = "synthetic"\nlearning_rate = 1\n')
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {bad}: unknown field 'learning_rate'; "
        "python -m training train --help lists every option"
    )
    assert main(["train", "--config", str(SYNTHETIC), "--epochs=many"]) == 2
    assert "field 'epochs'" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--config",
                str(SYNTHETIC),
                "--dataset=movielens-100k",
                "--data-dir",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "missing data set folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "none.pt"), "--repository", str(tmp_path)]) == 2
    capsys.readouterr()
    assert main(["train", "stray"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: command line: unexpected argument 'stray' (options are --key=value)"
    )


def test_selection_reads_validation_and_the_blend_covers_its_ends(
    synthetic_run: dict[str, Any],
) -> None:
    block = synthetic_run["results"]["shares"]["0.2"]
    sel, rows = block["selection"], block["strategies"]
    valid = sel["valid_ndcg@10"]
    assert sel["chosen"] == max(valid, key=lambda n: valid[n])
    assert sel["chosen_cold"] in sel["valid_cold_ndcg@10"]
    assert rows[sel["best_baseline"]]["kind"] == "baseline"
    blend = rows["blend"]["train"]
    partner, model = blend["params"]["partner"], blend["model"]
    # weight 0 is the model and weight 1 the partner: the blend is never below either
    assert valid["blend"] >= max(valid[partner], valid[model]) - 1e-9
    cold = sel["valid_cold_ndcg@10"]
    assert cold["blend"] >= cold[blend["cold"]["params"]["partner"]] - 1e-9
    ckpt = torch.load(synthetic_run["run_dir"] / "checkpoint.pt", weights_only=False)
    assert ckpt["metrics"]["validation"]["best_baseline"] == sel["best_baseline"]
    assert ckpt["strategy"] == sel["exported"]
    # what is published is the row validation chooses, for warm and for cold users, and the
    # published graphs score the test users as the in-memory exported tables do
    assert sel["exported_rows"] == {"warm": sel["chosen"], "cold": sel["chosen_cold"]}
    for seg in ("warm", "cold"):
        served, exported = rows["served_graph"][seg], rows["exported"][seg]
        assert served["ndcg@10"] == pytest.approx(exported["ndcg@10"], abs=1e-6)


@pytest.mark.parametrize("strategy", ["anchored", "joint"])
def test_opt_in_strategies_transfer_on_planted_tastes(strategy: str) -> None:
    from training.data.splits import make_split
    from training.data.synthetic import make_synthetic
    from training.transfer import pretrain_source, train_strategy

    cfg = load_config(SYNTHETIC, ["--threads=1", "--epochs=15", "--source_epochs=15"])
    split = make_split(make_synthetic(seed=0), "target", "source", cold_share=0.2, seed=0)
    device = torch.device("cpu")
    source = pretrain_source(split, cfg, device)
    _, base = train_strategy("target_only", split, cfg, device, source)
    _, info = train_strategy(strategy, split, cfg, device, source)
    assert float(info["valid_ndcg@10"]) > 1.3 * float(base["valid_ndcg@10"])  # type: ignore[arg-type]

"""Offline batch scoring (`python -m offline`): the pipeline in-process over a model
repository, printing one JSON object per user."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devtools.tiny_models import make_tiny_model, publish_tiny_model
from offline.__main__ import main

pytestmark = pytest.mark.integration


def test_cli_prints_ranked_items_per_user(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = publish_tiny_model(tmp_path, make_tiny_model())
    users_file = tmp_path / "users.txt"
    users_file.write_text("c1\nnobody\n")
    code = main(
        [
            f"--repository={tmp_path}",
            "--domain=books",
            "--users=u2",
            f"--users-file={users_file}",
            "--k=5",
        ]
    )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["user_id"] for line in lines] == ["u2", "c1", "nobody"]
    u2, c1, nobody = lines
    for answer, user in ((u2, "u2"), (c1, "c1")):
        row = model.user_ids.index(user)
        ids = [i["item_id"] for i in answer["items"]]
        assert len(ids) == 5 == len(set(ids))
        assert not set(ids) & {model.item_ids[j] for j in model.seen.get(row, [])}
        expected = model.scores(user, ids)
        assert [i["score"] for i in answer["items"]] == pytest.approx(expected.tolist())
        assert list(expected) == sorted(expected, reverse=True)
        assert {model.item_cluster[model.item_ids.index(i)] for i in ids} == {
            model.user_cluster[row]
        }
        assert {"model_name": "books-ranker", "model_version": "1"} in answer["model_versions"]
    assert c1["items"][0]["source"] == "TRANSFER"
    assert {i["source"] for i in nobody["items"]} == {"POPULAR"}
    assert not any(answer["degraded"] for answer in lines)


def test_cli_refuses_a_missing_domain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    publish_tiny_model(tmp_path, make_tiny_model())
    assert main([f"--repository={tmp_path}", "--domain=music", "--users=u1"]) == 1
    assert "music-retrieval" in capsys.readouterr().err

"""A published baseline (cross-domain EASE as factorised tables) loaded by the real retrieval
service: warm users get its ANN candidates, cold-start users its TRANSFER candidates, both in
the order of the dense baseline's scores."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from recsys.v1 import common_pb2
from tests.integration.test_retrieval_service import Retrieval
from training.baselines import Validator, fit_baselines
from training.config import Config
from training.data.splits import make_split
from training.data.synthetic import make_synthetic
from training.export_onnx import publish
from training.run import build_checkpoint, validation_users
from training.served import factorise
from training.transfer import Tables

pytestmark = pytest.mark.integration

ANN = common_pb2.CANDIDATE_SOURCE_ANN
TRANSFER = common_pb2.CANDIDATE_SOURCE_TRANSFER


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    data = make_synthetic(n_users=150, n_source_items=60, n_target_items=40, seed=5)
    split = make_split(data, "target", "source", protocol="ratio", cold_share=0.2, seed=0)
    validator = Validator(split, validation_users(split, 0))
    sel = fit_baselines(split, validator, ["cd_ease"])["cd_ease"]
    assert sel.linear is not None
    form = factorise(sel.linear, 1000)  # full rank: the served scores are the dense ones
    cfg = Config(dataset="synthetic", source="source", target="target", ranker="dot")
    ckpt = build_checkpoint(
        cfg, data, split, "cd_ease", Tables(users=form.users, items=form.items), {}
    )
    repo = tmp_path_factory.mktemp("repo")
    version = publish(ckpt, repo)
    return {"split": split, "ckpt": ckpt, "scorer": sel.scorer, "repo": repo, "version": version}


@pytest.fixture(scope="module")
def service(published: dict[str, Any]) -> Iterator[Retrieval]:
    svc = Retrieval(published["repo"])
    yield svc
    svc.close()


def _check(service: Retrieval, published: dict[str, Any], kind: str, source: int) -> None:
    split, ckpt = published["split"], published["ckpt"]
    row = ckpt["user_kinds"].index(kind)
    user = ckpt["users"][row]
    u = list(split.users).index(user)
    dense = published["scorer"](np.array([u]))[0].numpy()
    seen = set(split.train[split.train[:, 0] == u, 1].tolist())
    reply = service.retrieve(
        user_id=user, domain="target", k=5, exclude_seen=True, sources=[source]
    )
    assert reply.model.model_version == str(published["version"])
    got = [ckpt["items"].index(c.item_id) for c in reply.candidates]
    assert len(got) == 5 and not set(got) & seen
    assert {c.source for c in reply.candidates} == {source}
    # the candidates are the dense baseline's best unseen items, with its scores
    best = sorted((j for j in range(len(dense)) if j not in seen), key=lambda j: -dense[j])[:5]
    np.testing.assert_allclose(sorted(dense[got]), sorted(dense[best]), atol=1e-4)
    np.testing.assert_allclose([c.score for c in reply.candidates], dense[got], atol=1e-4)


def test_warm_user_gets_the_baselines_candidates(
    service: Retrieval, published: dict[str, Any]
) -> None:
    _check(service, published, "target", ANN)


def test_cold_start_user_gets_the_baselines_candidates_from_source_history(
    service: Retrieval, published: dict[str, Any]
) -> None:
    _check(service, published, "mapped", TRANSFER)


def test_version_metadata_names_the_baseline(published: dict[str, Any]) -> None:
    from recsys.repository import read_metadata, version_dir

    meta = read_metadata(version_dir(published["repo"], "target-retrieval", published["version"]))
    assert meta["strategy"] == "cd_ease"

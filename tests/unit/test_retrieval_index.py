"""The retrieval index without gRPC: loading a published version, exact and HNSW search, the
candidate sources and the exclusions, on a tiny model with planted tastes."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest

from devtools.tiny_models import TinyModel, make_tiny_model, publish_tiny_model
from recsys.candidates import Source
from recsys.repository import RepositoryError, version_dir
from serving.retrieval.index import IndexOptions, RetrievalIndex, domain_of


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TinyModel]:
    # Published without items.faiss (as before stored indexes): the index is built at load, so
    # the load options choose it.
    repo = tmp_path_factory.mktemp("repo")
    return repo, publish_tiny_model(repo, make_tiny_model(n_items=400), index=None)


def load(repo: Path, model: TinyModel, **options: int) -> RetrievalIndex:
    directory = version_dir(repo, "books-retrieval", model.version)
    return RetrievalIndex.load(directory, "books-retrieval", IndexOptions(**options))


def brute_force(model: TinyModel, vector: np.ndarray, k: int, excluded: set[int]) -> list[str]:
    scores = model.item_emb @ vector
    order = [j for j in np.argsort(-scores, kind="stable") if j not in excluded]
    return [model.item_ids[j] for j in order[:k]]


def test_domain_of_model_names() -> None:
    assert domain_of("books-retrieval") == "books"
    for bad in ("books-ranker", "-retrieval", "books"):
        with pytest.raises(ValueError):
            domain_of(bad)


def test_exact_index_matches_brute_force_and_planted_tastes(
    published: tuple[Path, TinyModel],
) -> None:
    repo, model = published
    index = load(repo, model)
    assert index.index_kind == "flat" and index.version == model.version
    for user in ("u0", "u5", "u13"):
        row = model.user_ids.index(user)
        result = index.retrieve(user, 20)
        assert result.sources == (Source.ANN,)
        ids = [c.item_id for c in result.candidates]
        assert ids == brute_force(model, model.user_emb[row], 20, set())
        clusters = {int(model.item_cluster[model.item_ids.index(i)]) for i in ids[:10]}
        assert clusters == {int(model.user_cluster[row])}
        assert all(c.title.startswith("Item ") for c in result.candidates)


def test_hnsw_index_above_the_size_setting_has_high_recall(
    published: tuple[Path, TinyModel],
) -> None:
    repo, model = published
    index = load(repo, model, exact_search_max_items=100)
    assert index.index_kind == "hnsw"
    hits = total = 0
    for row, user in enumerate(model.user_ids[:20]):
        exact = set(brute_force(model, model.user_emb[row], 50, set()))
        got = {c.item_id for c in index.retrieve(user, 50).candidates}
        hits += len(exact & got)
        total += 50
    assert hits / total >= 0.95


@pytest.mark.parametrize("exact_max", [50_000, 100])
def test_exclusions_are_over_fetched(published: tuple[Path, TinyModel], exact_max: int) -> None:
    repo, model = published
    index = load(repo, model, exact_search_max_items=exact_max)
    row = model.user_ids.index("u3")
    top = brute_force(model, model.user_emb[row], 40, set())
    excluded_ids = top[:25]
    history = top[25:27]
    result = index.retrieve(
        "u3", 30, exclude_item_ids=excluded_ids, exclude_seen=True, history_item_ids=history
    )
    ids = [c.item_id for c in result.candidates]
    seen = {model.item_ids[j] for j in model.seen[row]}
    assert len(ids) == 30 == len(set(ids))
    assert not set(ids) & (set(excluded_ids) | set(history) | seen)
    excluded_rows = {model.item_ids.index(i) for i in [*excluded_ids, *history, *seen]}
    if exact_max > 400:
        assert ids == brute_force(model, model.user_emb[row], 30, excluded_rows)


def test_cold_start_user_gets_transfer_candidates_of_its_taste(
    published: tuple[Path, TinyModel],
) -> None:
    repo, model = published
    index = load(repo, model)
    row = model.user_ids.index("c2")
    result = index.retrieve("c2", 10)
    assert result.sources == (Source.TRANSFER,)
    assert all(c.source == Source.TRANSFER for c in result.candidates)
    assert {
        int(model.item_cluster[model.item_ids.index(c.item_id)]) for c in result.candidates
    } == {int(model.user_cluster[row])}


def test_unknown_user_gets_history_neighbours_or_popular_items(
    published: tuple[Path, TinyModel],
) -> None:
    repo, model = published
    index = load(repo, model)
    history = [model.item_ids[j] for j in np.flatnonzero(model.item_cluster == 2)[:3]]
    result = index.retrieve("stranger", 10, history_item_ids=history, exclude_seen=True)
    assert result.sources == (Source.HISTORY,)
    assert not {c.item_id for c in result.candidates} & set(history)
    clusters = [int(model.item_cluster[model.item_ids.index(c.item_id)]) for c in result.candidates]
    assert clusters.count(2) >= 8

    popular = index.retrieve("stranger", 10)
    assert popular.sources == (Source.POPULAR,)
    counts = [c.score for c in popular.candidates]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == float(model.popularity.max())


def test_sources_limit_what_is_used_and_popular_fills_up(
    published: tuple[Path, TinyModel],
) -> None:
    repo, model = published
    index = load(repo, model)
    only_popular = index.retrieve("u1", 5, sources=[Source.POPULAR])
    assert [c.source for c in only_popular.candidates] == [Source.POPULAR] * 5
    assert index.retrieve("stranger", 5, sources=[Source.ANN]).candidates == []
    # More than the catalogue holds: every item once, ANN first then the popular fill.
    everything = index.retrieve("u1", 1000, exclude_item_ids=["i0"])
    ids = [c.item_id for c in everything.candidates]
    assert len(ids) == 399 == len(set(ids)) and "i0" not in ids


def test_a_version_with_a_bad_file_is_refused(tmp_path: Path) -> None:
    model = publish_tiny_model(tmp_path, make_tiny_model())
    directory = version_dir(tmp_path, "books-retrieval", model.version)
    np.save(directory / "item_embeddings.npy", np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(RepositoryError, match="SHA-256"):
        RetrievalIndex.load(directory, "books-retrieval", IndexOptions())


def test_a_loaded_version_is_frozen_from_the_collector_and_freed_when_dropped(
    published: tuple[Path, TinyModel],
) -> None:
    repo, model = published
    gc.disable()  # only reference counting may free the dropped version below
    try:
        index = load(repo, model)
        assert gc.get_freeze_count() > 0  # its objects are outside the collector's generations
        assert index.retrieve(model.user_ids[0], 5).candidates
        dropped = weakref.ref(index)
        del index
        assert dropped() is None  # no reference cycle keeps it alive
    finally:
        gc.enable()

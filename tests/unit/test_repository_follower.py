"""The version follower on its own, with a loader that reads a marker file: policies, the
fallback when the newest version is deleted, failures kept, retried on request and with backoff,
unloading after the last request, entries that are no version, and versions without READY."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from recsys.repository import READY_FILE, FollowPolicy, VersionFollower, VersionPublisher
from recsys.rpc.errors import ModelNotReady, NotFound


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def publish(repo: Path, name: str = "m-ranker", *, good: bool = True) -> int:
    with VersionPublisher(repo, [name]) as pub:
        d = pub.stage(name)
        (d / "payload.txt").write_text("good" if good else "bad")
        (d / "metadata.json").write_text(json.dumps({"kind": "ranker"}))
    assert pub.version is not None
    return pub.version


def payload_path(repo: Path, version: int, name: str = "m-ranker") -> Path:
    return repo / name / str(version) / "payload.txt"


class Harness:
    """A follower whose loaded value is the version's payload; records every hook."""

    def __init__(self, repo: Path, policy: FollowPolicy | None = None, **kwargs: object) -> None:
        self.clock = Clock()
        self.failures: list[str] = []
        self.unloaded: list[int] = []
        self.loads: list[int] = []

        def load(name: str, version: int, directory: Path) -> str:
            self.loads.append(version)
            text = (directory / "payload.txt").read_text()
            if text != "good":
                raise ValueError(f"payload of version {version} is {text!r}")
            return f"{name}:{version}"

        self.follower: VersionFollower[str] = VersionFollower(
            repo,
            kind="ranker",
            models=kwargs.pop("models", []),  # type: ignore[arg-type]
            load=load,
            policy=policy or FollowPolicy(),
            on_failure=self.failures.append,
            on_unload=lambda name, version, value: self.unloaded.append(version),
            retry_base_s=10.0,
            retry_max_s=40.0,
            clock=self.clock,
        )

    def reload(self, retry_failed: bool = False) -> bool:
        return asyncio.run(self.follower.reload(retry_failed=retry_failed))


def test_latest_policy_follows_new_versions_and_falls_back_when_the_newest_is_deleted(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path)
    publish(tmp_path)
    publish(tmp_path)
    assert h.reload()
    assert h.follower.versions("m-ranker") == [2]
    assert h.follower.resolve("m-ranker", None) == "m-ranker:2"
    publish(tmp_path)
    assert h.reload()
    assert h.follower.versions("m-ranker") == [3] and h.unloaded == [2]
    shutil.rmtree(tmp_path / "m-ranker" / "3")
    assert h.reload()
    assert h.follower.versions("m-ranker") == [2]
    assert h.unloaded == [2, 3]
    # Nothing left at all: the served version stays.
    shutil.rmtree(tmp_path / "m-ranker")
    assert not h.reload()
    assert h.follower.versions("m-ranker") == [2]


@pytest.mark.parametrize(
    ("policy", "served"),
    [(FollowPolicy("all"), [1, 2, 3]), (FollowPolicy("specific", (1, 3, 9)), [1, 3])],
)
def test_all_and_specific_policies(tmp_path: Path, policy: FollowPolicy, served: list[int]) -> None:
    for _ in range(3):
        publish(tmp_path)
    h = Harness(tmp_path, policy)
    h.reload()
    assert h.follower.versions("m-ranker") == served
    with pytest.raises(NotFound, match=r"served: \["):
        h.follower.resolve("m-ranker", 2 if 2 not in served else 7)


def test_a_failed_version_keeps_the_old_one_and_is_retried_with_backoff_or_on_request(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path)
    publish(tmp_path)
    h.reload()
    bad = publish(tmp_path, good=False)
    assert not h.reload()
    assert h.follower.versions("m-ranker") == [1]
    assert h.failures == ["m-ranker"]
    failure = h.follower.failures("m-ranker")[bad]
    assert failure.attempts == 1 and "payload of version 2" in failure.reason
    # Polls within the backoff neither retry nor recount it.
    h.clock.now += 9
    h.reload()
    assert h.loads.count(bad) == 1 and h.failures == ["m-ranker"]
    # After the backoff it is retried (and counted again), then the delay doubles.
    h.clock.now += 2
    h.reload()
    assert h.loads.count(bad) == 2 and len(h.failures) == 2
    assert h.follower.failures("m-ranker")[bad].attempts == 2
    h.clock.now += 15
    h.reload()
    assert h.loads.count(bad) == 2
    # The version is repaired: a poll within the backoff leaves it, a retry on request loads it.
    payload_path(tmp_path, bad).write_text("good")
    h.reload()
    assert h.follower.versions("m-ranker") == [1]
    assert h.reload(retry_failed=True)
    assert h.follower.versions("m-ranker") == [bad]
    assert h.follower.failures("m-ranker") == {}


def test_backoff_retry_loads_a_version_repaired_later(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    publish(tmp_path)
    bad = publish(tmp_path, good=False)
    h.reload()
    assert h.follower.versions("m-ranker") == [1]
    payload_path(tmp_path, bad).write_text("good")
    h.clock.now += 10
    h.reload()
    assert h.follower.versions("m-ranker") == [bad]


def test_retired_versions_unload_after_their_last_request(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    publish(tmp_path)

    async def scenario() -> None:
        await h.follower.reload()
        with h.follower.use("m-ranker", None) as value:
            assert value == "m-ranker:1"
            publish(tmp_path)
            await h.follower.reload()
            assert h.follower.versions("m-ranker") == [2]
            assert h.unloaded == []  # still in use
        assert h.unloaded == [1]

    asyncio.run(scenario())


def test_entries_that_are_no_version_are_counted_once_and_never_fatal(tmp_path: Path) -> None:
    publish(tmp_path)
    for name in ("²", "٣", "07", "0", "v2"):
        (tmp_path / "m-ranker" / name).mkdir()
    h = Harness(tmp_path, models=["m-ranker"])
    h.reload()
    assert h.follower.versions("m-ranker") == [1]
    assert h.failures == ["m-ranker"] * 5
    h.reload()
    assert len(h.failures) == 5


def test_versions_without_their_ready_marker_are_not_loaded(tmp_path: Path) -> None:
    h = Harness(tmp_path, models=["m-ranker"])
    with pytest.raises(ModelNotReady):
        h.follower.resolve("m-ranker", None)
    publish(tmp_path)
    v2 = publish(tmp_path)
    ready = tmp_path / "m-ranker" / str(v2) / READY_FILE
    marker = ready.read_bytes()
    ready.unlink()
    h.reload()
    assert h.follower.versions("m-ranker") == [1] and v2 not in h.loads and not h.failures
    ready.write_bytes(marker)
    h.reload()
    assert h.follower.versions("m-ranker") == [v2]


def test_discovery_serves_only_models_of_its_kind(tmp_path: Path) -> None:
    publish(tmp_path, "a-ranker")
    with VersionPublisher(tmp_path, ["a-retrieval"]) as pub:
        d = pub.stage("a-retrieval")
        (d / "payload.txt").write_text("good")
        (d / "metadata.json").write_text(json.dumps({"kind": "retrieval"}))
    h = Harness(tmp_path)
    h.reload()
    assert h.follower.model_names() == ["a-ranker"]
    with pytest.raises(NotFound):
        h.follower.resolve("a-retrieval", None)

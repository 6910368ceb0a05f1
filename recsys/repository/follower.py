"""The version follower: which versions of each model a service serves, kept in step with the
repository (policy, loading off the event loop, swaps, retries with backoff, unloading)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Literal, Protocol, TypeVar

from recsys.repository.layout import (
    RepositoryError,
    list_models,
    model_kind,
    read_metadata,
    scan_versions,
    version_dir,
)
from recsys.rpc.errors import ModelNotReady, NotFound

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Policy(Protocol):
    """Which versions are served: 'latest' (the newest loadable one), 'all', or 'specific'."""

    @property
    def kind(self) -> str: ...
    @property
    def versions(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class FollowPolicy:
    kind: Literal["latest", "all", "specific"] = "latest"
    versions: tuple[int, ...] = ()


LATEST = FollowPolicy()


@dataclass(frozen=True)
class Failure:
    """A version that failed to load: why, how often, and when it may be tried again."""

    reason: str
    attempts: int
    retry_at: float


@dataclass(eq=False)
class _Entry(Generic[T]):
    version: int
    value: T
    refs: int = 0
    retired: bool = False


@dataclass
class _ModelState(Generic[T]):
    served: dict[int, _Entry[T]] = field(default_factory=dict)
    failed: dict[int, Failure] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)  # invalid entries already counted


Loader = Callable[[str, int, Path], T]
Hook = Callable[[str, int, T], None]
UnloadHook = Callable[[str, int, T], Awaitable[None] | None]


class VersionFollower(Generic[T]):
    """Follows the versions of some models (the configured ones, or every model of `kind` in the
    repository) and holds the served ones.

    Each scan applies the policy. A version is loaded by `load` (verify, read, warm; blocking)
    on a loader thread, never on the event loop; `on_serve` runs just before it joins the served
    set, which is swapped in one assignment. A version that fails to load is logged and counted
    (`on_failure`), the served versions stay, and it is tried again on `reload(retry_failed=True)`
    (SIGHUP) or, with exponential backoff, on a later scan. A version that leaves the served set
    is retired (`on_retire`) and unloaded (`on_unload`) once its last request is done. When the
    newest served version is deleted, the newest remaining loadable one takes its place.
    Entries that are no version (e.g. a directory named '²') and versions without their READY
    marker are never loaded; the first are counted once as failures.
    """

    def __init__(
        self,
        root: Path,
        *,
        kind: str,
        models: list[str],
        load: Loader[T],
        policy: Policy = LATEST,
        on_serve: Hook[T] | None = None,
        on_retire: Hook[T] | None = None,
        on_unload: UnloadHook[T] | None = None,
        on_failure: Callable[[str], None] | None = None,
        accept: Callable[[str], bool] | None = None,
        fatal: tuple[type[BaseException], ...] = (),
        poll_interval_s: float = 5.0,
        retry_base_s: float | None = None,
        retry_max_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if policy.kind not in ("latest", "all", "specific"):
            raise ValueError(f"unknown version policy {policy.kind!r}")
        self.root = Path(root)
        self.kind = kind
        self.policy = policy
        self.poll_interval_s = poll_interval_s
        self.retry_base_s = (
            retry_base_s if retry_base_s is not None else max(2 * poll_interval_s, 10.0)
        )
        self.retry_max_s = retry_max_s
        self._configured = list(models)
        self._load_fn = load
        self._on_serve = on_serve
        self._on_retire = on_retire
        self._on_unload = on_unload
        self._on_failure = on_failure
        self._accept = accept
        self._fatal = fatal
        self._clock = clock
        self._models: dict[str, _ModelState[T]] = {name: _ModelState() for name in models}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{kind}-loader")
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        self._poller: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    # -- what is served ---------------------------------------------------------------------

    def model_names(self) -> list[str]:
        return sorted(self._models)

    def is_known(self, name: str) -> bool:
        return name in self._models

    def ready(self) -> bool:
        """Every configured (or discovered) model has a version served."""
        return bool(self._models) and all(s.served for s in self._models.values())

    def any_ready(self) -> bool:
        return any(s.served for s in self._models.values())

    def versions(self, name: str) -> list[int]:
        state = self._models.get(name)
        return sorted(state.served) if state else []

    def failures(self, name: str) -> dict[int, Failure]:
        state = self._models.get(name)
        return dict(state.failed) if state else {}

    def latest(self, name: str) -> T | None:
        state = self._models.get(name)
        if state is None or not state.served:
            return None
        return state.served[max(state.served)].value

    def served(self, name: str) -> dict[int, T]:
        state = self._models.get(name)
        return {v: e.value for v, e in state.served.items()} if state else {}

    def _entry(self, name: str, version: int | None) -> _Entry[T]:
        state = self._models.get(name)
        if state is None:
            raise NotFound(f"model {name!r} is not served here (models: {self.model_names()})")
        served = state.served
        if not served:
            raise ModelNotReady(f"model {name!r} has no version loaded yet")
        if version is None:
            return served[max(served)]
        found = served.get(version)
        if found is None:
            raise NotFound(
                f"version {version} of model {name!r} is not served (served: {sorted(served)})"
            )
        return found

    def resolve(self, name: str, version: int | None) -> T:
        """The served version a request names (None: the latest served)."""
        return self._entry(name, version).value

    @contextlib.contextmanager
    def use(self, name: str, version: int | None) -> Iterator[T]:
        """Hold a served version for one request: it is not unloaded before the request ends."""
        entry = self._entry(name, version)
        entry.refs += 1
        try:
            yield entry.value
        finally:
            entry.refs -= 1
            if entry.retired and entry.refs == 0:
                self._unload(name, entry)

    # -- following the repository -----------------------------------------------------------

    def _get_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def reload(self, *, retry_failed: bool = False) -> bool:
        """Scan the repository once and apply the policy to every model; `retry_failed` tries
        versions that failed before at once (SIGHUP). Returns whether the served set changed."""
        changed = False
        loop = asyncio.get_running_loop()
        async with self._get_lock():
            for name in await loop.run_in_executor(self._executor, self._names):
                state = self._models.setdefault(name, _ModelState())
                if retry_failed:
                    state.failed.clear()
                try:
                    changed |= await self._reload_model(name, state)
                except self._fatal:
                    raise
                except Exception as exc:
                    logger.exception("Following %s failed", name)
                    self._count_failure(name, f"scan failed: {exc!r}")
            if self._ready is not None and self.ready():
                self._ready.set()
        return changed

    def _names(self) -> list[str]:
        if self._configured:
            return self._configured
        try:
            candidates = list_models(self.root)
        except (RepositoryError, OSError) as exc:
            logger.error("Cannot scan the model repository: %s", exc)
            return list(self._models)
        names = []
        for name in candidates:
            if name in self._models or self._discover(name):
                names.append(name)
        return names

    def _discover(self, name: str) -> bool:
        """Whether a model found in the repository is of this follower's kind, judged by its
        newest published version (unreadable metadata: by the name's suffix)."""
        if self._accept is not None and not self._accept(name):
            return False
        try:
            published = scan_versions(self.root, name).published
        except OSError:
            return False
        if not published:
            return False
        try:
            metadata = read_metadata(version_dir(self.root, name, published[-1]))
        except RepositoryError:
            metadata = {}
        kind = model_kind(metadata, name)
        if kind != self.kind:
            logger.debug("Skipping %s: a %s model, not a %s", name, kind, self.kind)
        return kind == self.kind

    def _count_failure(self, name: str, reason: str) -> None:
        if self._on_failure is not None:
            self._on_failure(name)

    def _report_scan(self, name: str, state: _ModelState[T], invalid: tuple[str, ...]) -> None:
        for entry in invalid:
            if entry not in state.reported:
                state.reported.add(entry)
                logger.error(
                    "%s: %r in %s is not a version (version directories are positive integers "
                    "in ASCII digits); skipped",
                    name,
                    entry,
                    self.root / name,
                )
                self._count_failure(name, f"invalid version directory {entry!r}")

    def _loadable(self, state: _ModelState[T], version: int, now: float) -> bool:
        failure = state.failed.get(version)
        return failure is None or failure.retry_at <= now

    async def _reload_model(self, name: str, state: _ModelState[T]) -> bool:
        scan = await asyncio.get_running_loop().run_in_executor(
            self._executor, scan_versions, self.root, name
        )
        self._report_scan(name, state, scan.invalid)
        if scan.incomplete:
            logger.debug("%s: versions %s are not published yet (no READY)", name, scan.incomplete)
        available = list(scan.published)
        served = state.served
        now = self._clock()
        loaded: dict[int, T] = {}
        wanted: list[int] = []
        if self.policy.kind == "latest":
            for version in reversed(available):
                if version in served:
                    wanted = [version]
                    break
                if not self._loadable(state, version, now):
                    continue
                value = await self._load(name, version, state)
                if value is not None:
                    loaded[version] = value
                    wanted = [version]
                    break
        else:
            candidates = (
                available
                if self.policy.kind == "all"
                else [v for v in self.policy.versions if v in available]
            )
            for version in candidates:
                if version in served:
                    wanted.append(version)
                elif self._loadable(state, version, now):
                    value = await self._load(name, version, state)
                    if value is not None:
                        loaded[version] = value
                        wanted.append(version)
        if not wanted:
            if served:
                logger.warning(
                    "%s: no servable version in the repository (found %s); keeping %s",
                    name,
                    available,
                    sorted(served),
                )
            return False
        if not loaded and set(wanted) == set(served):
            return False
        new: dict[int, _Entry[T]] = {}
        for version in wanted:
            if version in served:
                new[version] = served[version]
            else:
                if self._on_serve is not None:
                    self._on_serve(name, version, loaded[version])
                new[version] = _Entry(version, loaded[version])
        state.served = new  # the swap: requests resolve against the new set from here on
        gone = [e for v, e in served.items() if v not in new]
        logger.info(
            "%s: serving versions %s%s",
            name,
            sorted(new),
            f" (retiring {sorted(e.version for e in gone)})" if gone else "",
        )
        for entry in gone:
            self._retire(name, entry)
        return True

    async def _load(self, name: str, version: int, state: _ModelState[T]) -> T | None:
        directory = version_dir(self.root, name, version)
        loop = asyncio.get_running_loop()
        try:
            value = await loop.run_in_executor(
                self._executor, self._load_fn, name, version, directory
            )
        except self._fatal:
            raise  # the machine, not the version, is wrong: the service stops
        except Exception as exc:
            reason = str(exc) if isinstance(exc, RepositoryError) else f"{exc!r}"
            previous = state.failed.get(version)
            attempts = (previous.attempts if previous else 0) + 1
            delay = min(self.retry_max_s, self.retry_base_s * 2 ** (attempts - 1))
            state.failed[version] = Failure(reason, attempts, self._clock() + delay)
            self._count_failure(name, reason)
            logger.error(
                "Failed to load %s version %d (attempt %d; retried in %.0f s or on SIGHUP): %s",
                name,
                version,
                attempts,
                delay,
                reason,
            )
            return None
        state.failed.pop(version, None)
        return value

    def _retire(self, name: str, entry: _Entry[T]) -> None:
        entry.retired = True
        if self._on_retire is not None:
            self._on_retire(name, entry.version, entry.value)
        if entry.refs == 0:
            self._unload(name, entry)

    def _unload(self, name: str, entry: _Entry[T]) -> None:
        if self._on_unload is None:
            return
        result = self._on_unload(name, entry.version, entry.value)
        if inspect.isawaitable(result):
            awaitable = result

            async def finish() -> None:
                await awaitable

            self._spawn(finish())

    def _spawn(self, coro: Awaitable[object]) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception:
                logger.exception("Background work of the %s follower failed", self.kind)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every model, start polling, and return once every model has a served version
        (a model with no loadable version keeps this waiting until one appears)."""
        self._ready = asyncio.Event()
        await self.reload()
        if self.ready():
            self._ready.set()
        self.start_polling()
        if not self.ready():
            missing = [n for n, s in self._models.items() if not s.served] or ["(none found)"]
            logger.warning("Not ready: no loadable version yet for %s", ", ".join(missing))
        await self._ready.wait()

    def start_polling(self) -> None:
        if self.poll_interval_s > 0 and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self.poll(self.poll_interval_s))

    async def poll(self, interval_s: float) -> None:
        """Scan every `interval_s` seconds until cancelled; a failed scan is logged."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reload()
            except Exception:
                logger.exception("Scanning the model repository failed")

    def request_reload(self) -> None:
        """Scan soon, retrying versions that failed before (SIGHUP)."""
        logger.info("Reload requested: retrying failed versions")
        self._spawn(self.reload(retry_failed=True))

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        for name, state in self._models.items():
            served, state.served = state.served, {}
            for entry in served.values():
                self._retire(name, entry)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self._executor.shutdown(wait=False)

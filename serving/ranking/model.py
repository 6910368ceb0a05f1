"""One version of a ranker model: its id vocabularies and one ONNX Runtime session, checked
against the ranker contract and warmed before it takes traffic. No gRPC here."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from recsys.repository import (
    FEATURES_INPUT,
    ITEMS_FILE,
    MODEL_FILE,
    RANKER_SIGNATURE,
    USERS_FILE,
    RepositoryError,
    check_signature,
    ranker_signature_for,
    read_items,
    read_users,
    verify_version,
)
from recsys.repository.layout import ITEM_INPUT, SCORE_OUTPUT, USER_INPUT
from serving.ranking.checks import quote
from serving.ranking.precision import SelectedGraph, select_graph
from serving.ranking.vocab import build_vocabulary

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PLATFORM = "onnxruntime_onnx"
__all__ = ["FEATURES_INPUT", "ITEM_INPUT", "MODEL_FILE", "SCORE_OUTPUT", "USER_INPUT"]

DOT = "dot"
FEATURES = "features"

# The ranker contract (recsys.repository.RANKER_SIGNATURE) as the wire adapters read it.
CONTRACT_INPUTS = {t.name: t.datatype for t in RANKER_SIGNATURE.inputs}
CONTRACT_OUTPUTS = {t.name: t.datatype for t in RANKER_SIGNATURE.outputs}


class ModelLoadError(Exception):
    """A version could not be loaded: missing or corrupt files, wrong signature, bad vocabulary."""


class ProviderUnavailable(RuntimeError):
    """The execution provider that the settings demand is not available on this machine."""


class UnknownIds(LookupError):
    """Ids that the version's vocabulary does not contain."""

    def __init__(self, kind: str, ids: Sequence[str], total: int) -> None:
        self.kind = kind
        self.ids = list(ids)
        self.total = total
        shown = ", ".join(quote(i) for i in self.ids[:5])
        more = f" and {total - len(self.ids[:5])} more" if total > 5 else ""
        super().__init__(f"unknown {kind} id{'s' if total > 1 else ''}: {shown}{more}")


_preload_lock = threading.Lock()
_preloaded = False


def _preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries that onnxruntime-gpu needs (from the nvidia-* wheels or
    torch), when this onnxruntime offers it; once per process."""
    global _preloaded
    with _preload_lock:
        if _preloaded:
            return
        _preloaded = True
        preload = getattr(ort, "preload_dlls", None)
        if preload is None:
            return
        try:
            preload()
        except Exception:  # a failed preload shows up below as a session without CUDA
            logger.warning("onnxruntime.preload_dlls() failed", exc_info=True)


def resolve_providers(requested: str) -> list[str]:
    """The ONNX Runtime providers to ask for: 'cpu'; 'cuda' (fails if unavailable); 'auto' (CUDA
    when onnxruntime-gpu sees it, else CPU with a warning)."""
    if requested == "cpu":
        return [CPU]
    available = ort.get_available_providers()
    if CUDA in available:
        _preload_cuda_libraries()
        return [CUDA, CPU]
    if requested == "cuda":
        raise ProviderUnavailable(
            f"provider 'cuda' was requested but this onnxruntime ({ort.__version__}) offers only "
            f"{available}: install onnxruntime-gpu (pip install '.[gpu]') on a machine with a GPU"
        )
    logger.warning(
        "CUDAExecutionProvider is not available (onnxruntime %s offers %s); using CPU",
        ort.__version__,
        available,
    )
    return [CPU]


def provider_label(provider: str) -> str:
    """'CUDAExecutionProvider' -> 'cuda' (the metric label and the log's short name)."""
    return provider.removesuffix("ExecutionProvider").lower()


@dataclass(frozen=True)
class SessionOptions:
    """How sessions are created: providers, thread counts, IO binding, warm-up size."""

    providers: tuple[str, ...] = (CPU,)
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    io_binding: bool = False
    warmup_candidates: int = 1024
    allow_spinning: bool = True
    # CPU only: a second session with this many intra-op threads scores a request that finds the
    # server otherwise idle (0: none). Its pool threads never spin.
    solo_intra_op_threads: int = 0
    require_provider: bool = False  # the first provider or nothing (RANKING_PROVIDER=cuda)
    precision: str = "fp32"  # the graph to serve where the version has it (RANKING_PRECISION)


def _session(
    path: Path, options: SessionOptions, intra_op_threads: int, *, spinning: bool | None = None
) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if not (options.allow_spinning if spinning is None else spinning):
        # Idle ONNX Runtime threads sleep instead of spinning, leaving the cores to gRPC.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=so, providers=list(options.providers))


def _index(ids: list[str], path: Path) -> dict[str, int]:
    index = {item: i for i, item in enumerate(ids)}
    if len(index) != len(ids):
        raise ModelLoadError(f"{path} has duplicate ids")
    return index


class RankerModel:
    """A loaded, checked and warmed ranker version. `score` is thread-safe (one shared session,
    and optionally a wider one for requests that have the machine to themselves)."""

    graph = SelectedGraph()  # the file, precision and tensor names it is served from

    def __init__(
        self,
        name: str,
        version: int,
        directory: Path,
        metadata: dict[str, Any],
        session: ort.InferenceSession,
        user_ids: list[str],
        item_ids: list[str],
        io_binding: bool,
        solo_session: ort.InferenceSession | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.directory = directory
        self.metadata = metadata
        self.session = session
        self.solo_session = solo_session
        self.user_ids = user_ids
        self.item_ids = item_ids
        self.user_index = _index(user_ids, directory / USERS_FILE)
        self.item_index = _index(item_ids, directory / ITEMS_FILE)
        # None where two ids share a hash (~n**2 / 2**65): then exact dict lookups.
        self._hashed_items = build_vocabulary(item_ids)
        self.provider = session.get_providers()[0]
        self.io_binding = io_binding
        self._device = "cuda" if self.provider == CUDA else "cpu"
        # The kind the signature declares: DOT (user_index, item_index) or FEATURES (features
        # [N, F], whose columns and expected retrieval version the metadata names).
        self.input_names = [spec["name"] for spec in metadata["inputs"]]
        self.kind = FEATURES if self.input_names == [FEATURES_INPUT] else DOT
        features = metadata.get("features") or {}
        self.feature_names: list[str] = list(features.get("names", []))
        self.features_model: str = str(features.get("retrieval_model", ""))
        self.features_version: str = str(features.get("retrieval_version", ""))

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def solo_threads(self) -> int:
        """Intra-op threads of the solo session (0: none)."""
        if self.solo_session is None:
            return 0
        return int(self.solo_session.get_session_options().intra_op_num_threads)

    @property
    def provider_label(self) -> str:
        return provider_label(self.provider)

    @classmethod
    def load(cls, name: str, version: int, directory: Path, options: SessionOptions) -> RankerModel:
        """Verify the files, read the vocabularies, create the session, check it, warm it."""
        start = time.perf_counter()
        try:
            metadata = verify_version(directory)
            if metadata.get("kind", "ranker") != "ranker":
                raise RepositoryError(
                    f"{directory}: metadata kind is {metadata.get('kind')!r}, not 'ranker'"
                )
            user_ids = read_users(directory / USERS_FILE).ids
            item_ids = read_items(directory / ITEMS_FILE).ids
            graph = select_graph(name, version, directory, metadata, options.precision)
        except RepositoryError as exc:
            raise ModelLoadError(str(exc)) from exc
        try:
            session = _session(graph.path, options, options.intra_op_threads)
        except Exception as exc:  # ORT raises several exception types for unreadable graphs
            raise ModelLoadError(f"{graph.path}: ONNX Runtime cannot load it: {exc}") from exc
        actual = session.get_providers()[0]
        if actual != options.providers[0]:
            if options.require_provider:
                raise ProviderUnavailable(
                    f"{name} v{version}: {options.providers[0]} is required but ONNX Runtime "
                    f"created the session on {actual} (are the CUDA and cuDNN libraries present?)"
                )
            logger.warning(
                "%s v%d: no %s session, running on %s", name, version, options.providers[0], actual
            )
        try:
            check_signature(
                metadata,
                graph.names.as_contract(session.get_inputs()),
                graph.names.as_contract(session.get_outputs(), outputs=True),
                directory,
                expected=ranker_signature_for(metadata, directory),
                graph_file=graph.path.name,
            )
            features = metadata.get("features")
            if isinstance(features, dict) and metadata["inputs"][0]["name"] == FEATURES_INPUT:
                if not features.get("retrieval_version") or not features.get("retrieval_model"):
                    raise RepositoryError(
                        f"{directory}: a feature ranker's metadata must name the retrieval "
                        "model and version whose features it expects"
                    )
        except RepositoryError as exc:
            raise ModelLoadError(str(exc)) from exc
        solo = None
        if options.solo_intra_op_threads > 1 and session.get_providers()[0] == CPU:
            solo = _session(graph.path, options, options.solo_intra_op_threads, spinning=False)
        model = cls(
            name,
            version,
            directory,
            metadata,
            session,
            user_ids,
            item_ids,
            options.io_binding,
            solo,
        )
        model.graph = graph
        model.warm_up(options.warmup_candidates)
        if solo is not None:
            model.warm_up(options.warmup_candidates, solo=True)
        logger.info(
            "Loaded %s version %d from %s (%s) on %s (%d users, %d items) in %.2f s",
            name,
            version,
            graph.path,
            graph.precision,
            model.provider,
            model.n_users,
            model.n_items,
            time.perf_counter() - start,
        )
        return model

    def warm_up(self, max_candidates: int, *, solo: bool = False) -> None:
        """Run the sizes the service will see (one pair, a typical request, the largest batch) so
        that allocations and kernel choices happen before traffic, and check the outputs: one
        finite score per pair. The batches cover the first and last rows of both vocabularies,
        every row where the largest batch is long enough, and a fixed random sample beyond."""
        largest = max(1, max_candidates)
        sizes = sorted({1, 7, min(1000, largest), largest})
        rng = np.random.default_rng(0)
        for n in sizes:
            users: np.ndarray
            if self.kind == FEATURES:
                # Feature rows of both signs and a few magnitudes; no vocabulary to cover.
                users = rng.standard_normal((n, len(self.feature_names))).astype(np.float32)
                items = np.zeros(n, dtype=np.int64)
            else:
                users = np.arange(n, dtype=np.int64) % self.n_users
                items = np.arange(n, dtype=np.int64) % self.n_items
                if n == largest and n > 2:
                    users[-1], items[-1] = self.n_users - 1, self.n_items - 1
                    if n > self.n_items:  # every item is covered: pair them with random users
                        users[self.n_items : -1] = rng.integers(
                            0, self.n_users, n - self.n_items - 1
                        )
                    else:
                        half = n // 2
                        items[half:-1] = rng.integers(0, self.n_items, n - half - 1)
            try:
                scores = self.score(users, items, solo=solo)
            except Exception as exc:
                raise ModelLoadError(
                    f"{self.name} v{self.version}: warm-up with {n} candidates failed: {exc}"
                ) from exc
            finite = np.isfinite(scores)
            if scores.shape != (n,) or not finite.all():
                bad = np.flatnonzero(~finite)[:1].tolist() if scores.shape == (n,) else []
                where = (
                    f" (e.g. user index {int(users[bad[0]])}, item index {int(items[bad[0]])})"
                    if bad and self.kind == DOT
                    else ""
                )
                raise ModelLoadError(
                    f"{self.name} v{self.version}: warm-up with {n} candidates gave scores of "
                    f"shape {scores.shape}, expected ({n},); {int((~finite).sum())} not "
                    f"finite{where}"
                )

    def lookup(self, user_id: str, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Map wire ids to this version's indices; raises UnknownIds naming the first few."""
        user = self.user_index_of(user_id)
        ids = item_ids if isinstance(item_ids, list) else list(item_ids)
        items = self.item_indices(ids)
        if len(ids) and items.min() < 0:
            missing = np.flatnonzero(items < 0)
            raise UnknownIds("item", [ids[i] for i in missing[:5]], len(missing))
        return np.full(len(ids), user, dtype=np.int64), items

    def user_index_of(self, user_id: str) -> int:
        """The user's index; raises UnknownIds for a user this version does not know."""
        user = self.user_index.get(user_id)
        if user is None:
            raise UnknownIds("user", [user_id], 1)
        return user

    def item_indices(self, item_ids: Sequence[str]) -> np.ndarray:
        """The items' indices, -1 for ids this version does not know."""
        # A list first: iterating a protobuf repeated field directly is several times slower.
        ids = item_ids if isinstance(item_ids, list) else list(item_ids)
        if self._hashed_items is not None:
            return self._hashed_items.lookup(ids)
        return np.fromiter(map(self.item_index.get, ids, repeat(-1)), np.int64, len(ids))

    def score(
        self, user_index: np.ndarray, item_index: np.ndarray, *, solo: bool = False
    ) -> np.ndarray:
        """Scores (float32, one per pair) from one session run; thread-safe. A feature ranker
        takes its FP32 [N, F] feature rows as `user_index` (the batcher joins either kind row
        by row) and ignores `item_index`. `solo`: on the wider session where there is one."""
        session = self.solo_session if solo and self.solo_session is not None else self.session
        if self.kind == FEATURES:
            contract = {FEATURES_INPUT: np.ascontiguousarray(user_index, dtype=np.float32)}
        else:
            contract = {USER_INPUT: user_index, ITEM_INPUT: item_index}
        feeds = self.graph.names.feeds(contract)
        output = self.graph.names.output(SCORE_OUTPUT)
        if self.io_binding:
            binding = session.io_binding()
            for name, array in feeds.items():
                if self._device == "cpu":
                    binding.bind_cpu_input(name, array)
                else:
                    binding.bind_ortvalue_input(
                        name, ort.OrtValue.ortvalue_from_numpy(array, self._device, 0)
                    )
            binding.bind_output(output, self._device)
            session.run_with_iobinding(binding)
            out = binding.copy_outputs_to_cpu()[0]
        else:
            out = session.run([output], feeds)[0]
        scores = np.asarray(out, dtype=np.float32).reshape(-1)
        if scores.shape[0] != user_index.shape[0]:
            raise RuntimeError(
                f"{self.name} v{self.version} returned {scores.shape[0]} scores for "
                f"{user_index.shape[0]} candidates"
            )
        return scores

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "provider": self.provider,
            "precision": self.graph.precision,
            "solo_intra_op_threads": self.solo_threads,
            "users": self.n_users,
            "items": self.n_items,
            "kind": self.kind,
        }

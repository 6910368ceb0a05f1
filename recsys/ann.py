"""Nearest-neighbour indexes over a version's item embeddings: the type chosen by catalogue size,
built once at publish time into the version (items.faiss), memory-mapped and checked at load."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from recsys.repository.layout import RepositoryError, read_metadata, sha256_file, write_json

logger = logging.getLogger(__name__)

INDEX_FILE = "items.faiss"
EMBEDDINGS_FILE = "item_embeddings.npy"
METADATA_KEY = "index"  # the section of metadata.json that describes items.faiss
FLAT, HNSW, IVFPQ, IVFPQ_FS = "flat", "hnsw", "ivfpq", "ivfpqfs"
KINDS = (FLAT, HNSW, IVFPQ, IVFPQ_FS)
IVF_KINDS = (IVFPQ, IVFPQ_FS)
_ADD_CHUNK = 262_144

# How each kind is memory-mapped: flat and HNSW storage through FAISS's mapped reader for
# IndexFlatCodes (IO_FLAG_MMAP_IFC, FAISS >= 1.10), IVF inverted lists as read-only on-disk lists
# (IO_FLAG_MMAP). Where the flag is missing the index is read into memory. Fast-scan codes are
# held in blocks that FAISS has no mapped form of: read into memory (codes and ids, 40 bytes per
# item with the default pq_m).
_MMAP_FLAG_NAMES: dict[str, str | None] = {
    FLAT: "IO_FLAG_MMAP_IFC",
    HNSW: "IO_FLAG_MMAP_IFC",
    IVFPQ: "IO_FLAG_MMAP",
    IVFPQ_FS: None,
}


class IndexFileError(RepositoryError):
    """A stored index is unreadable, or does not match the version's items."""


@dataclass(frozen=True)
class AnnParams:
    """How an index is chosen, built and searched (docs/scale.md#retrieval-indexes).

    Exact inner-product search up to `exact_max_items` items, HNSW up to `hnsw_max_items`, IVF
    with 4-bit fast-scan PQ codes (ivfpqfs) above; HNSW and IVF candidates are re-scored exactly
    against the stored item vectors. `ivfpq` (8-bit PQ codes over the Euclidean reduction) is
    what versions published before ivfpqfs hold: still read and searched, built only on request."""

    exact_max_items: int = 50_000
    hnsw_max_items: int = 500_000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128
    ivf_nlist: int = 0  # 0: the power of two nearest 4 sqrt(n_items), within [64, 65536]
    ivf_nprobe: int = 0  # 0: an eighth of the lists (nprobe_for)
    pq_m: int = 64  # sub-quantizers per item code: 4 bits each (ivfpqfs: one per dimension at
    # dim 64, 32-byte codes; docs/scale.md#measured), 8 bits each (ivfpq)
    rerank_factor: int = 4  # IVF: candidates fetched per result, re-scored exactly
    train_per_list: int = 64  # IVF: training vectors per inverted list (capped at n_items)
    seed: int = 0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], prefix: str = "") -> AnnParams:
        """Parameters from `values` (`prefix` + field name), the defaults for what is absent."""
        found = {f.name: values[prefix + f.name] for f in fields(cls) if prefix + f.name in values}
        return cls(**{k: int(v) for k, v in found.items()}).checked()

    def checked(self) -> AnnParams:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"index parameter {f.name} must be >= 0")
        if self.hnsw_max_items < self.exact_max_items:
            raise ValueError("index parameter hnsw_max_items must be >= exact_max_items")
        for name in ("hnsw_m", "hnsw_ef_search", "pq_m", "rerank_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"index parameter {name} must be >= 1")
        return self

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def choose_kind(n_items: int, params: AnnParams) -> str:
    """flat up to `exact_max_items`, hnsw up to `hnsw_max_items`, ivfpqfs above."""
    if n_items <= params.exact_max_items:
        return FLAT
    if n_items <= params.hnsw_max_items:
        return HNSW
    return IVFPQ_FS


def nlist_for(n_items: int, params: AnnParams) -> int:
    """`ivf_nlist` lists, or (0) the power of two nearest 4 sqrt(n_items), within [64, 65536]:
    the lower end of FAISS's guideline (4 to 16 sqrt(n)). On the clustered 10 M-item catalogue
    of `make bench-index`, 16 384 lists probed an eighth at a time reach a higher recall@500 than
    4 096 lists probed a quarter at a time, scanning half as many codes (docs/scale.md#measured)."""
    if params.ivf_nlist:
        return max(1, min(params.ivf_nlist, n_items))
    target = 4 * math.sqrt(max(n_items, 1))
    return int(min(65_536, max(64, 2 ** round(math.log2(target)))))


def nprobe_for(nlist: int, params: AnnParams) -> int:
    """`ivf_nprobe` lists, or (0) an eighth of them: the 500 best items of a query in a large
    catalogue are a thin tail spread over many cells, so the probes grow with the lists."""
    return max(1, min(nlist, params.ivf_nprobe or nlist // 8))


def stored_width(kind: str, dim: int, params: AnnParams) -> int:
    """The width of the vectors the index holds: the embeddings for flat; for hnsw and ivfpq one
    more column (`mips_to_l2`); for ivfpq and ivfpqfs zero columns up to a multiple of `pq_m`."""
    if kind == FLAT:
        return dim
    if kind == HNSW:
        return dim + 1
    if kind == IVFPQ_FS:  # inner products searched directly: no extra column
        return int(math.ceil(dim / params.pq_m) * params.pq_m)
    return int(math.ceil((dim + 1) / params.pq_m) * params.pq_m)


def max_squared_norm(embeddings: np.ndarray) -> float:
    best = 0.0
    for start in range(0, len(embeddings), _ADD_CHUNK):
        block = np.asarray(embeddings[start : start + _ADD_CHUNK], dtype=np.float32)
        best = max(best, float(np.einsum("ij,ij->i", block, block).max(initial=0.0)))
    return best


def mips_to_l2(
    embeddings: np.ndarray, width: int | None = None, max_norm2: float | None = None
) -> np.ndarray:
    """Item vectors x -> [x, sqrt(M - |x|^2), 0...] (M the largest squared norm), so that the
    nearest items to [q, 0...] in Euclidean distance are those with the largest inner product
    with q. HNSW graphs built on raw inner products reach large-norm items well and the rest
    poorly; IVF cells are Euclidean too."""
    x = np.asarray(embeddings, dtype=np.float32)
    width = width or x.shape[1] + 1
    norms = np.einsum("ij,ij->i", x, x)
    top = float(norms.max(initial=0.0)) if max_norm2 is None else max_norm2
    out = np.zeros((len(x), width), dtype=np.float32)
    out[:, : x.shape[1]] = x
    out[:, x.shape[1]] = np.sqrt(np.maximum(top - norms, 0.0))
    return out


def _padded(query: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros((query.shape[0], width), dtype=np.float32)
    out[:, : query.shape[1]] = query
    return out


class AnnIndex:
    """A FAISS index over a version's items and the exact re-scoring of what it finds."""

    def __init__(
        self,
        index: faiss.Index,
        kind: str,
        embeddings: np.ndarray,
        params: AnnParams,
        *,
        mmapped: bool = False,
        stored: bool = False,
    ) -> None:
        self.index = index
        self.kind = kind
        self.embeddings = embeddings
        self.params = params
        self.mmapped = mmapped  # loaded with a memory-mapping flag
        self.stored = stored  # read from the version (not built at load)
        self.nprobe = 0
        if kind in IVF_KINDS:
            ivf = faiss.extract_index_ivf(index)
            self.nprobe = nprobe_for(int(ivf.nlist), params)
            ivf.nprobe = self.nprobe

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, query: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to `fetch` item rows for one query vector, best first, with their exact inner
        products (HNSW and IVF-PQ candidates re-scored against the stored item vectors)."""
        q = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
        n = self.ntotal
        fetch = min(fetch, n)
        if self.kind == FLAT:
            scores, rows = self.index.search(q, fetch)
            keep = rows[0] >= 0
            return rows[0][keep], scores[0][keep]
        width = int(self.index.d)
        if self.kind == HNSW:
            params = faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
                efSearch=max(self.params.hnsw_ef_search, fetch)
            )
            _, rows = self.index.search(_padded(q, width), fetch, params=params)
        else:  # ivfpq, ivfpqfs (zero columns: the same inner products / Euclidean reduction)
            candidates = min(n, fetch * self.params.rerank_factor)
            params = faiss.SearchParametersIVF(nprobe=self.nprobe)  # type: ignore[call-arg]
            _, rows = self.index.search(_padded(q, width), candidates, params=params)
        # Exact inner products of what the index found (rows in ascending order: fewer pages).
        found = np.sort(rows[0][rows[0] >= 0])
        exact = np.asarray(self.embeddings[found] @ q[0], dtype=np.float32)
        order = np.lexsort((found, -exact))[:fetch]
        return found[order], exact[order]


def build(embeddings: np.ndarray, params: AnnParams, kind: str | None = None) -> AnnIndex:
    """Build the index `choose_kind` picks (or `kind`) over `embeddings` [n, d] float32."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    n, dim = embeddings.shape
    kind = kind or choose_kind(n, params)
    start = time.perf_counter()
    width = stored_width(kind, dim, params)
    index: faiss.Index
    if kind == FLAT:
        index = faiss.IndexFlatIP(dim)
        for lo in range(0, n, _ADD_CHUNK):
            index.add(np.ascontiguousarray(embeddings[lo : lo + _ADD_CHUNK]))
    elif kind == IVFPQ_FS:
        params = resolved(params, n)
        index = _build_ivfpq_fs(embeddings, width, params)
    else:
        top = max_squared_norm(embeddings)
        if kind == HNSW:
            index = faiss.IndexHNSWFlat(width, params.hnsw_m, faiss.METRIC_L2)
            index.hnsw.efConstruction = params.hnsw_ef_construction
            index.hnsw.efSearch = params.hnsw_ef_search
        elif kind == IVFPQ:
            params = resolved(params, n)
            nlist = params.ivf_nlist
            # A flat coarse quantizer: assigning items to lists is one matrix product per chunk
            # (an HNSW quantizer only pays off with many more lists than the default).
            ivf = faiss.IndexIVFPQ(faiss.IndexFlatL2(width), width, nlist, params.pq_m, 8)
            ivf.cp.niter = 10
            ivf.pq.cp.niter = 15
            index = ivf
            sample = _training_sample(n, nlist, params)
            index.train(mips_to_l2(embeddings[sample], width, top))
            ivf.nprobe = params.ivf_nprobe
        else:
            raise ValueError(f"unknown index kind {kind!r}; known: {KINDS}")
        for lo in range(0, n, _ADD_CHUNK):
            index.add(mips_to_l2(embeddings[lo : lo + _ADD_CHUNK], width, top))
    logger.info(
        "Built a %s index over %d items (dim %d) in %.1f s",
        kind,
        n,
        dim,
        time.perf_counter() - start,
    )
    return AnnIndex(index, kind, embeddings, params)


def resolved(params: AnnParams, n_items: int) -> AnnParams:
    """`params` with the IVF lists and probes the defaults (0) stand for at `n_items`, so that a
    version records what it was built and is searched with, whatever later defaults become."""
    nlist = nlist_for(n_items, params)
    return replace(params, ivf_nlist=nlist, ivf_nprobe=nprobe_for(nlist, params))


def _training_sample(n: int, nlist: int, params: AnnParams) -> np.ndarray:
    rng = np.random.default_rng(params.seed)
    n_train = min(n, max(nlist * params.train_per_list, 256 * 64))
    return np.sort(rng.choice(n, size=n_train, replace=False))


def _build_ivfpq_fs(embeddings: np.ndarray, width: int, params: AnnParams) -> faiss.Index:
    """IVF over inner products (a flat IP coarse quantizer) with residuals coded by `pq_m`
    4-bit sub-quantizers scanned with SIMD lookup tables (`IndexIVFPQFastScan`). With inner
    products the lookup table does not depend on the list probed, so its 8-bit quantization
    keeps its precision however many lists are probed (with the Euclidean reduction it does
    not: the table's range grows with each farther list)."""
    n = len(embeddings)
    nlist = params.ivf_nlist
    index = faiss.IndexIVFPQFastScan(
        faiss.IndexFlatIP(width), width, nlist, params.pq_m, 4, faiss.METRIC_INNER_PRODUCT
    )
    index.cp.niter = 10
    index.train(_padded(embeddings[_training_sample(n, nlist, params)], width))
    index.nprobe = params.ivf_nprobe
    for lo in range(0, n, _ADD_CHUNK):
        index.add(_padded(embeddings[lo : lo + _ADD_CHUNK], width))
    return index


def describe(ann: AnnIndex, dim: int, index_sha256: str, embeddings_sha256: str) -> dict[str, Any]:
    """The metadata.json section of a stored index."""
    return {
        "file": INDEX_FILE,
        "kind": ann.kind,
        "ntotal": ann.ntotal,
        "dim": dim,
        "stored_dim": int(ann.index.d),
        "sha256": index_sha256,
        "embeddings_sha256": embeddings_sha256,
        "params": ann.params.to_json(),
        "faiss_version": faiss.__version__,
    }


def stage_index(directory: Path, params: AnnParams, kind: str | None = None) -> dict[str, Any]:
    """Build the index over a staged version's item_embeddings.npy (the kind `choose_kind` picks,
    or `kind`), write it as items.faiss and record it in the staged metadata.json (call after
    `VersionPublisher.describe` and after the embeddings are written). Returns the metadata
    section."""
    embeddings_path = directory / EMBEDDINGS_FILE
    embeddings = np.load(embeddings_path, mmap_mode="r")
    if embeddings.ndim != 2 or embeddings.dtype != np.float32:
        raise ValueError(f"{embeddings_path}: expected a 2-D float32 array")
    ann = build(embeddings, params, kind)
    faiss.write_index(ann.index, str(directory / INDEX_FILE))
    section = describe(
        ann,
        int(embeddings.shape[1]),
        sha256_file(directory / INDEX_FILE),
        sha256_file(embeddings_path),
    )
    metadata = read_metadata(directory)
    metadata[METADATA_KEY] = section
    write_json(directory / "metadata.json", metadata)
    return section


def _read(path: Path, kind: str) -> tuple[faiss.Index, bool]:
    """The index memory-mapped where this FAISS can map its kind, else read into memory."""
    name = _MMAP_FLAG_NAMES[kind]
    if name is None:
        return faiss.read_index(str(path)), False
    flag = getattr(faiss, name, None)
    if flag is not None:
        try:
            return faiss.read_index(str(path), flag | faiss.IO_FLAG_READ_ONLY), True
        except RuntimeError as exc:
            logger.warning("Cannot memory-map %s (%s); reading it into memory", path, exc)
    else:
        logger.info("This FAISS has no %s: reading %s into memory", _MMAP_FLAG_NAMES[kind], path)
    return faiss.read_index(str(path)), False


_TYPES = {
    FLAT: faiss.IndexFlatIP,
    HNSW: faiss.IndexHNSWFlat,
    IVFPQ: faiss.IndexIVFPQ,
    IVFPQ_FS: faiss.IndexIVFPQFastScan,
}


def load(
    directory: Path,
    metadata: Mapping[str, Any],
    embeddings: np.ndarray,
    search: AnnParams | None = None,
) -> AnnIndex:
    """The stored index of a verified version (`verify_version` checked every file's SHA-256),
    memory-mapped where its type allows, after checking it belongs to these items: the SHA-256
    of items.faiss and of the embeddings it was built from, its kind, size and width. Searches
    use the version's parameters unless `search` gives others (its ef_search, nprobe unless 0,
    and rerank_factor). Raises IndexFileError."""
    section = metadata.get(METADATA_KEY)
    where = directory / INDEX_FILE
    if not isinstance(section, dict):
        raise IndexFileError(f"{directory}/metadata.json: '{METADATA_KEY}' must be an object")
    files = metadata.get("files") or {}
    kind = section.get("kind")
    n, dim = embeddings.shape
    if section.get("file") != INDEX_FILE or INDEX_FILE not in files:
        raise IndexFileError(f"{where}: not listed in metadata.json's files")
    if kind not in KINDS:
        raise IndexFileError(f"{where}: unknown index kind {kind!r} (known: {', '.join(KINDS)})")
    if section.get("sha256") != files[INDEX_FILE]:
        raise IndexFileError(f"{where}: its SHA-256 is not the one recorded when it was built")
    if section.get("embeddings_sha256") != files.get(EMBEDDINGS_FILE):
        raise IndexFileError(
            f"{where} was built from other item embeddings than {EMBEDDINGS_FILE} (SHA-256 differs)"
        )
    if section.get("ntotal") != n or section.get("dim") != dim:
        raise IndexFileError(
            f"{where}: metadata says {section.get('ntotal')} items of dim {section.get('dim')}, "
            f"the version has {n} of dim {dim}"
        )
    try:
        stored_params = AnnParams.from_mapping(section.get("params") or {})
    except (TypeError, ValueError) as exc:
        raise IndexFileError(f"{where}: bad index parameters in metadata.json: {exc}") from exc
    params = stored_params
    if search is not None:
        params = replace(
            stored_params,
            hnsw_ef_search=search.hnsw_ef_search,
            ivf_nprobe=search.ivf_nprobe or stored_params.ivf_nprobe,
            rerank_factor=search.rerank_factor,
        )
    try:
        index, mmapped = _read(where, kind)
    except RuntimeError as exc:  # FAISS raises RuntimeError on unreadable files
        raise IndexFileError(f"{where} cannot be read by FAISS: {exc}") from exc
    if not isinstance(index, _TYPES[kind]):
        raise IndexFileError(f"{where} holds a {type(index).__name__}, expected a {kind} index")
    expected_width = stored_width(kind, dim, stored_params)
    if index.ntotal != n or index.d != expected_width or section.get("stored_dim") != index.d:
        raise IndexFileError(
            f"{where} holds {index.ntotal} vectors of width {index.d}, expected {n} of width "
            f"{expected_width}"
        )
    return AnnIndex(index, kind, embeddings, params, mmapped=mmapped, stored=True)

"""Training configuration: every default in one visible block, TOML override files per
experiment (``training/configs/*.toml``) and ``--key=value`` command-line overrides."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys.ann import AnnParams
from training.errors import ConfigError

STRATEGIES = ("finetune", "freeze_unfreeze", "shared_private", "anchored", "joint", "emcdr")
DEFAULT_STRATEGIES = ("finetune", "freeze_unfreeze", "shared_private", "emcdr")  # anchored,
# joint: opt-in
BASELINES = ("popularity", "itemknn", "cd_itemknn", "ease", "cd_ease")
LOSSES = ("softmax", "sampled_softmax", "bpr")
SHARDING = ("auto", "rows", "off")
NEGATIVE_SAMPLERS = ("popularity", "uniform", "in_batch")


@dataclass
class Config:
    # --- data -----------------------------------------------------------------------------
    dataset: str = "amazon-books-movies"  # folder under data_dir unless absolute (docs/data.md)
    data_dir: str = ""  # folder of data set folders; "" = $RECSYS_DATA_DIR, else ../shared/data
    source: str = "movies"  # source domain; "" trains the target domain alone
    target: str = "books"  # target domain (names the published models: <target>-ranker)
    protocol: str = "ratio"  # "ratio" (RecBole 8:1:1, full ranking) or "loo" (sampled negatives)
    rating_threshold: float = 4.0  # ratings >= this are positives; ignored for implicit data
    k_core: int = 0  # iterative k-core filter on the target domain (0 = off)
    use_given_split: bool = True  # keep train/test files the data set ships (DisenCDR)
    cold_shares: list[float] = field(default_factory=lambda: [0.2, 0.5])  # one run per share;
    # the first share's models are the ones exported
    n_negatives: int = 999  # sampled negatives per test item under "loo"
    duplicates: str = "keep"  # target items duplicating a source item: "keep" (report), "drop"
    # (remove them from the target) or "merge" (one item: the source copy's rows join the target's)
    duplicate_jaccard: float = 0.8  # user-set Jaccard at or above which items are duplicates
    # --- model ----------------------------------------------------------------------------
    dim: int = 64  # embedding size of both towers
    tower_hidden: int = 0  # hidden width of a residual MLP on each tower (0 = plain embeddings)
    init_std: float = 0.1  # std of the embedding initialisation
    item_bias: bool = True  # learn an item bias (folded into the dot product as one more dim)
    loss: str = "softmax"  # "softmax" (full softmax over every item), "sampled_softmax" (shared
    # negatives per batch with the logQ correction; for large catalogues) or "bpr"
    negative_sampler: str = "popularity"  # sampled_softmax negatives: "popularity" (training
    # counts (count + 1) ** sampler_alpha), "uniform", or "in_batch" (the batch's positives)
    sampled_negatives: int = 1024  # sampled_softmax: items drawn per batch from negative_sampler
    # (popularity or uniform), shared by every pair of the batch
    sampler_alpha: float = 0.75  # exponent of the popularity proposal (0 = uniform, 1 = unigram)
    mixed_negatives: bool = False  # sampled_softmax: the batch's positives as negatives too
    # (mixed negative sampling), beside the sampled_negatives drawn from negative_sampler
    sparse_embeddings: bool = False  # embedding tables take sparse gradients, SparseAdam moves
    # only the rows of a batch (lazy Adam; needs loss sampled_softmax or bpr)
    shard_embeddings: str = "auto"  # under torchrun: "rows" (each process holds its slice of the
    # rows of every embedding table; needs loss sampled_softmax or bpr), "off" (every process
    # holds whole tables under DDP) or "auto" (rows once the item table passes shard_auto_bytes,
    # with a loss other than the full softmax)
    shard_auto_bytes: int = 2**28  # item-table size (items x dim x 4 B) at which "auto" shards
    temperature: float = 1.0  # softmax temperature
    reg: float = 0.05  # L2 on the embeddings of each (user, item) pair; the main regulariser
    reg_grid: list[float] = field(default_factory=list)  # if set: every strategy is trained at
    # each of these L2 values and the best on validation kept (per strategy; [] = reg only)
    # --- optimisation ---------------------------------------------------------------------
    epochs: int = 60  # maximum epochs for target-domain training
    source_epochs: int = 60  # maximum epochs for source pretraining
    batch_size: int = 1024  # global batch size (split across DDP processes)
    lr: float = 0.01  # Adam learning rate
    patience: int = 4  # stop after this many validations without improvement
    eval_every: int = 1  # validate every N epochs; the best validated epoch is kept
    # --- transfer -------------------------------------------------------------------------
    strategies: list[str] = field(default_factory=lambda: list(DEFAULT_STRATEGIES))  # transfer
    # strategies to train; target_only and popularity always run ("" = none)
    finetune_user_lr_scale: float = 1.0  # finetune: learning-rate factor on the shared user table
    freeze_epochs: int = 0  # freeze_unfreeze: cap of the frozen phase, stops early (0 = epochs)
    unfreeze_lr_scale: float = 0.3  # freeze_unfreeze: learning-rate factor after unfreezing
    private_reg_scale: float = 0.2  # shared_private: factor on reg for the private user vectors
    joint_source_weight: float = 0.5  # joint: loss weight of the source pairs
    anchor_tau: float = 5.0  # anchored: target pairs at which the pull to the source halves
    mapping_hidden: int = 128  # emcdr: hidden width of the source->target mapping MLP
    mapping_epochs: int = 300  # emcdr: full-batch epochs fitting the mapping
    export_strategy: str = "best"  # what to publish: "best" (the row validation chooses among
    # baselines, two-tower strategies and the blend, for warm and cold users) or a strategy name
    allow_below_popularity: bool = False  # publish even when the exported model's validation
    # NDCG@10 is below popularity's (otherwise nothing is published and the run exits 2)
    # --- baselines (training/baselines.py; grids declared there, chosen on validation) --------
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))  # baselines to evaluate
    ease_max_items: int = 4000  # EASE solves on at most this many (most popular) items
    factor_ranks: list[int] = field(default_factory=lambda: [64, 128, 256, 512])  # ranks of the
    # truncated SVD a baseline is published at (chosen on validation, capped by the catalogue)
    neural: bool = True  # train the two-tower models (false: evaluate the baselines only)
    blend: bool = True  # also evaluate the validated blend of the exported model and best baseline
    # --- second stage (training/ranker.py) ----------------------------------------------------
    ranker: str = "learned"  # "learned": train the feature ranker (published as the target's
    # ranker, the dot product beside it as its dot ranker); "dot": the dot product only
    ranker_depth: int = 500  # personal candidates per user, as the gateway asks retrieval
    ranker_popular: int = 50  # popular candidates merged in, as the gateway does
    ranker_users: int = 3000  # at most this many warm validation users label the ranker
    ranker_cold_share: float = 1.0  # simulated cold-start users (training users, target history
    # hidden, mapped vector, training items as labels) per warm user training the ranker
    ranker_recent_share: float = 0.5  # share of warm training users also shown with recent items
    ranker_folds: int = 4  # cross-fitted members, each trained on all warm validation users but
    # one fold's and judged on that fold (training/ranker.py: cross_fit)
    neighbours: int = 50  # item-to-item neighbours kept per item (published with retrieval)
    # --- retrieval index, built at publish into items.faiss (recsys/ann.py, docs/scale.md) -----
    index_exact_max_items: int = 50_000  # exact inner-product index up to this many items
    index_hnsw_max_items: int = 500_000  # HNSW up to this many items, IVF fast-scan PQ above
    index_hnsw_m: int = 32  # HNSW graph degree
    index_hnsw_ef_construction: int = 80  # HNSW build-time beam width
    index_hnsw_ef_search: int = 128  # HNSW search beam width (the service may override it)
    index_ivf_nlist: int = 0  # IVF inverted lists (0: power of two nearest 4 sqrt(items))
    index_ivf_nprobe: int = 0  # IVF lists per query (0: an eighth; a nonzero service's wins)
    index_pq_m: int = 64  # IVF-PQ sub-quantizers per item code (4 bits each: 32-byte codes)
    index_rerank_factor: int = 4  # IVF candidates per result, re-scored exactly
    # --- run ------------------------------------------------------------------------------
    seed: int = 0  # seeds the split, initialisation and batch order
    device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda"
    threads: int = 0  # torch CPU threads (0 = torch's default)
    progress: bool = True  # one tqdm bar per training phase (none when stderr is not a terminal)

    def validate(self) -> None:
        if self.protocol not in ("ratio", "loo"):
            raise ConfigError(f"protocol: expected 'ratio' or 'loo', got {self.protocol!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss: expected one of {', '.join(LOSSES)}, got {self.loss!r}")
        self._validate_sampling()
        for s in self.strategies:
            if s not in STRATEGIES:
                raise ConfigError(
                    f"strategies: unknown strategy {s!r}; known: {', '.join(STRATEGIES)}"
                )
        if self.duplicates not in ("keep", "drop", "merge"):
            raise ConfigError(
                f"duplicates: expected 'keep', 'drop' or 'merge', got {self.duplicates!r}"
            )
        for b in self.baselines:
            if b not in BASELINES:
                raise ConfigError(
                    f"baselines: unknown baseline {b!r}; known: {', '.join(BASELINES)}"
                )
        if self.export_strategy not in ("best", "target_only", *STRATEGIES):
            raise ConfigError(f"export_strategy: unknown strategy {self.export_strategy!r}")
        if not self.factor_ranks or any(int(r) <= 0 for r in self.factor_ranks):
            raise ConfigError("factor_ranks: at least one rank, every rank positive")
        if not self.target:
            raise ConfigError("target: a target domain is required")
        if not self.cold_shares:
            raise ConfigError("cold_shares: at least one share (0 for none) is required")
        for share in self.cold_shares:
            if not 0 <= share < 1 or (share > 0 and not self.source):
                raise ConfigError(
                    f"cold_shares: {share} must be in [0, 1) and needs a source domain"
                )
        for name in ("dim", "epochs", "batch_size", "eval_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive")
        if self.ranker not in ("learned", "dot"):
            raise ConfigError(f"ranker: expected 'learned' or 'dot', got {self.ranker!r}")
        for name in ("ranker_depth", "ranker_users", "neighbours"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive")
        if not 0 <= self.ranker_cold_share <= 4:
            raise ConfigError("ranker_cold_share: must be in [0, 4]")
        if not 0 <= self.ranker_recent_share <= 1:
            raise ConfigError("ranker_recent_share: must be in [0, 1]")
        if self.ranker_folds < 2:
            raise ConfigError(
                "ranker_folds: at least 2 (each member is judged on a fold it left out)"
            )
        if self.ranker_popular < 0:
            raise ConfigError("ranker_popular: must be >= 0")
        try:
            self.index_params()
        except ValueError as exc:
            raise ConfigError(str(exc).replace("index parameter ", "index_")) from exc
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device: expected auto, cpu or cuda, got {self.device!r}")

    def index_params(self) -> AnnParams:
        """The retrieval index parameters (the index_* fields)."""
        return AnnParams.from_mapping(self.to_dict(), prefix="index_")

    def _validate_sampling(self) -> None:
        if self.negative_sampler not in NEGATIVE_SAMPLERS:
            raise ConfigError(
                f"negative_sampler: expected one of {', '.join(NEGATIVE_SAMPLERS)}, "
                f"got {self.negative_sampler!r}"
            )
        if self.loss == "sampled_softmax":
            if self.negative_sampler == "in_batch" and self.mixed_negatives:
                raise ConfigError(
                    "mixed_negatives: adds sampled negatives to the in-batch ones; set "
                    "negative_sampler to 'popularity' or 'uniform' (or mixed_negatives = false)"
                )
            if self.negative_sampler != "in_batch" and self.sampled_negatives <= 0:
                raise ConfigError(
                    f"sampled_negatives: must be positive with negative_sampler = "
                    f"{self.negative_sampler!r}, got {self.sampled_negatives}"
                )
        if not 0 <= self.sampler_alpha <= 1:
            raise ConfigError(f"sampler_alpha: must be in [0, 1], got {self.sampler_alpha}")
        if self.sparse_embeddings and self.loss == "softmax":
            raise ConfigError(
                "sparse_embeddings: the full softmax updates every item row each step; "
                "use loss = 'sampled_softmax' or 'bpr' (or sparse_embeddings = false)"
            )
        if self.temperature <= 0:
            raise ConfigError(f"temperature: must be positive, got {self.temperature}")
        if self.shard_embeddings not in SHARDING:
            raise ConfigError(
                f"shard_embeddings: expected one of {', '.join(SHARDING)}, "
                f"got {self.shard_embeddings!r}"
            )
        if self.shard_embeddings == "rows" and self.loss == "softmax":
            raise ConfigError(
                "shard_embeddings: the full softmax scores every item row each step; "
                "use loss = 'sampled_softmax' or 'bpr' (or shard_embeddings = 'off')"
            )
        if self.shard_auto_bytes <= 0:
            raise ConfigError(f"shard_auto_bytes: must be positive, got {self.shard_auto_bytes}")

    def shard_rows(self, n_items: int) -> bool:
        """Whether training (under torchrun) shards the tables of a model of ``n_items`` items."""
        if self.shard_embeddings == "auto":
            return self.loss != "softmax" and n_items * self.dim * 4 >= self.shard_auto_bytes
        return self.shard_embeddings == "rows"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def update(
        self, values: dict[str, Any], origin: str, spell: Callable[[str], str] = repr
    ) -> None:
        """Set fields from ``values``; an unknown name is refused with the nearest known one."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(
                    f"{origin}: unknown field {spell(key)}{suggest(key, fields, spell)}"
                )
            setattr(self, key, _coerce(key, value, getattr(self, key), origin))


HELP = "python -m training train --help lists every option"


def suggest(name: str, known: Iterable[str], spell: Callable[[str], str] = repr) -> str:
    """``"; did you mean 'x'?"`` for the nearest known name, else where to find the names."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {spell(close[0])}?"
    return f"; {HELP}"


def _coerce(key: str, value: Any, current: Any, origin: str) -> Any:
    try:
        if isinstance(current, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if isinstance(current, list):
            if isinstance(value, str):
                parts = [p.strip() for p in value.split(",") if p.strip()]
            else:
                parts = list(value)
            kind = type(current[0]) if current else str
            return [kind(p) for p in parts]
        if isinstance(current, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(current, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{origin}: field {key!r}: cannot read {value!r} as {type(current).__name__}"
        ) from None


def field_help() -> dict[str, tuple[str, str]]:
    """``{field: (section, comment)}`` read from the commented block of :class:`Config`.

    The comments beside the fields are their documentation: ``train --help`` prints them, so the
    defaults and their explanations live in one place.
    """
    try:
        source = inspect.getsource(Config)
    except (OSError, TypeError):  # no source (frozen build): names and defaults only
        return {f.name: ("", "") for f in dataclasses.fields(Config)}
    out: dict[str, tuple[str, str]] = {}
    section, current = "", None
    for line in source.splitlines()[1:]:
        text = line.strip()
        if text.startswith("def "):
            break
        heading = re.fullmatch(r"# -+ (.+?) -+", text)
        if heading:
            section, current = heading.group(1), None
            continue
        declared = re.match(r"(\w+): [^=]+=", text)
        if declared:
            current = declared.group(1)
            _, _, comment = text.partition("  # ")
            out[current] = (section, comment.strip())
        elif text.startswith("#") and current is not None:
            sec, comment = out[current]
            out[current] = (sec, f"{comment} {text.lstrip('#').strip()}".strip())
        else:
            current = None
    return out


def format_default(value: Any) -> str:
    """A default as one would type it on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return repr(value) if value == "" else str(value)


def option_name(field_name: str) -> str:
    """The command-line spelling of a field: ``cold_shares`` -> ``--cold-shares``."""
    return "--" + field_name.replace("_", "-")


def load_config(path: Path | None, overrides: list[str]) -> Config:
    """Defaults, then the TOML file (if any), then ``key=value`` overrides."""
    cfg = Config()
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        cfg.update(values, str(path))
    pairs: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected --key=value")
        pairs[key.replace("-", "_")] = value
    cfg.update(pairs, "command line", option_name)
    cfg.validate()
    return cfg

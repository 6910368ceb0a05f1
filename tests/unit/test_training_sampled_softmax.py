"""The sampled softmax: its value, the logQ correction, accidental hits, the candidates of a batch,
sparse embedding gradients, its settings, that it learns the synthetic generator's tastes, and
that its blocked computation and the sparse-gradient Adam match their plain definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from training import model as model_module
from training.config import load_config
from training.data.synthetic import synthetic_pairs
from training.errors import ConfigError
from training.evaluate import full_ranking
from training.model import Candidates, TwoTower, accidental_hits, sampled_softmax_loss
from training.trainer import Sampling, _Batches, _RowAdam, fit

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """Small tensors: one thread (shared cores make several threads wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_value_by_hand() -> None:
    u = torch.tensor([[1.0, 0.0]])
    pos = torch.tensor([[1.0, 0.0]])  # s_pos = 1
    cand = torch.tensor([[0.0, 0.0], [2.0, 0.0]])  # s = 0 and 2
    log_expected = torch.tensor([math.log(2.0), 0.0])
    none = torch.zeros(1, 2, dtype=torch.bool)
    got = sampled_softmax_loss(u, pos, cand, log_expected, none, 1.0)
    # logsumexp([1, 0 - log 2, 2 - 0]) - 1
    want = math.log(math.e + 0.5 + math.e**2) - 1.0
    assert got.item() == pytest.approx(want, abs=1e-6)
    # the second candidate masked as an accidental hit; temperature 0.5 doubles every score
    hit = torch.tensor([[False, True]])
    got = sampled_softmax_loss(u, pos, cand, log_expected, hit, 0.5)
    assert got.item() == pytest.approx(math.log(math.e**2 + 0.5) - 2.0, abs=1e-6)


def test_accidental_hits_are_removed() -> None:
    """A candidate equal to the row's positive counts as if it had not been drawn."""
    torch.manual_seed(0)
    model = TwoTower(3, 6, 4)
    users, items = torch.tensor([0, 1]), torch.tensor([2, 5])
    lq = torch.tensor([0.3, -0.2, 0.1])
    with_hits = Candidates(torch.tensor([2, 1, 5]), lq)
    args = ("sampled_softmax", 0.0, 1.0, 1.0)
    a = model(users, items, with_hits, *args)
    # row 0 keeps candidates 1 and 5, row 1 keeps 2 and 1: the sum of the two rows' own losses
    r0 = model(users[:1], items[:1], Candidates(torch.tensor([1, 5]), lq[1:]), *args)
    r1 = model(users[1:], items[1:], Candidates(torch.tensor([2, 1]), lq[:2]), *args)
    torch.testing.assert_close(a, r0 + r1)


def test_logq_correction_recovers_the_full_softmax_gradient() -> None:
    """Summed over many draws from a skewed proposal, the corrected gradient points where the
    full softmax's does (the estimate is consistent: 64 draws per row give a cosine near
    0.998, 16 about 0.97); the same draws without the correction are biased to popular items
    (about 0.85)."""
    torch.manual_seed(1)
    n_items, dim, s, draws, pos_item = 8, 4, 64, 600, 3
    u0 = torch.randn(1, dim)
    v0 = torch.randn(n_items, dim) * 0.7

    def grad(loss_of: object) -> torch.Tensor:
        u, v = u0.clone().requires_grad_(), v0.clone().requires_grad_()
        loss_of(u, v).backward()  # type: ignore[operator]
        return torch.cat([u.grad.flatten(), v.grad.flatten()])  # type: ignore[union-attr]

    full = grad(lambda u, v: -torch.log_softmax(u @ v.T, 1)[0, pos_item])
    q = torch.tensor([0.4, 0.25, 0.12, 0.08, 0.06, 0.04, 0.03, 0.02])
    gen = torch.Generator().manual_seed(0)
    drawn = torch.multinomial(q, draws * s, replacement=True, generator=gen)
    # every draw is one row; a row sees only its own s candidates (the others are masked)
    block = torch.arange(draws * s) // s
    hits = (block.unsqueeze(0) != torch.arange(draws).unsqueeze(1)) | (drawn == pos_item)

    def sampled(log_expected: torch.Tensor) -> object:
        def loss(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            rows = u.expand(draws, dim)
            pos = v[pos_item].expand(draws, dim)
            return sampled_softmax_loss(rows, pos, v[drawn], log_expected, hits, 1.0).sum()

        return loss

    corrected = grad(sampled((s * q[drawn]).log()))
    naive = grad(sampled(torch.full((draws * s,), math.log(s / n_items))))  # as if uniform
    cos = torch.nn.functional.cosine_similarity
    assert cos(corrected, full, dim=0) > 0.995
    assert cos(naive, full, dim=0) < cos(corrected, full, dim=0) - 0.05


def test_candidates_of_a_batch() -> None:
    train = np.array([[0, 0], [1, 0], [2, 1], [3, 2], [0, 3], [1, 0]], dtype=np.int64)
    mixed = _Batches(train, "sampled_softmax", 4, 5, None, Sampling("uniform", 3, mixed=True))
    idx = torch.tensor([0, 2, 4, 5])
    c = mixed.candidates(idx, torch.Generator().manual_seed(0))
    assert c.items[:4].tolist() == [0, 1, 3, 0]  # the batch's positives, then 3 uniform draws
    assert c.items.numel() == 7 and int(c.items.max()) < 5
    p = torch.tensor([3, 1, 1, 1, 0]) / 6  # the training frequencies of the items
    want = (4 * p[c.items] + 3 * torch.full((7,), 0.2)).log()
    torch.testing.assert_close(c.log_expected, want.float())
    in_batch = _Batches(train, "sampled_softmax", 4, 5, None, Sampling("in_batch"))
    c = in_batch.candidates(idx, torch.Generator())
    assert c.items.tolist() == [0, 1, 3, 0]
    torch.testing.assert_close(c.log_expected, (4 * p[c.items]).log().float())


def test_popularity_proposal_draws_by_count_to_the_alpha() -> None:
    train = np.array([[0, 0]] * 9 + [[0, 1]] * 3 + [[0, 2]], dtype=np.int64)  # counts 9, 3, 1, 0
    b = _Batches(train, "sampled_softmax", 4, 4, None, Sampling("popularity", 20_000, alpha=0.5))
    c = b.candidates(torch.tensor([0]), torch.Generator().manual_seed(0))
    share = torch.bincount(c.items, minlength=4).double() / 20_000
    q = torch.tensor([10.0, 4.0, 2.0, 1.0]).sqrt()
    q /= q.sum()
    torch.testing.assert_close(share, q.double(), atol=0.01, rtol=0)
    torch.testing.assert_close(c.log_expected.double(), (20_000 * q[c.items]).log().double())


def test_softmax_targets_hold_every_pair_of_each_user() -> None:
    rng = np.random.default_rng(0)
    train = np.unique(np.stack([rng.integers(0, 30, 300), rng.integers(0, 40, 300)], 1), axis=0)
    b = _Batches(train, "softmax", 64, 40, None, Sampling())
    local = torch.tensor([5, 0, 17, 3])
    got = b._entries(local).dense(40)
    want = torch.zeros(4, 40)
    for row, j in enumerate(local.tolist()):
        user = int(b.units[j])
        want[row, train[train[:, 0] == user, 1]] = 1.0
    torch.testing.assert_close(got, want)


def _fit(model: TwoTower, train: np.ndarray, **kw: object) -> None:
    args: dict[str, object] = {
        "epochs": 3,
        "batch_size": 256,
        "lr": 0.02,
        "loss": "sampled_softmax",
        "reg": 1e-4,
        "temperature": 1.0,
        "patience": 10,
        "eval_every": 100,  # validated once, after the last epoch: that state is kept
        "seed": 0,
        "device": CPU,
        "desc": "t",
        "progress": False,
    }
    args.update(kw)
    fit(model, train, lambda _m: 0.0, **args)  # type: ignore[arg-type]


def test_sparse_embeddings_respect_gradient_masks() -> None:
    """With sparse gradients and SparseAdam, rows whose mask is 0 stay where they were."""
    train = np.unique(synthetic_pairs(40, 30, 800, n_topics=4, seed=2), axis=0)
    torch.manual_seed(0)
    model = TwoTower(40, 30, 8)
    before = model.user_emb.weight.detach().clone()
    mask = (torch.arange(40) % 2).float()  # odd users train, even users are frozen
    _fit(model, train, sparse_embeddings=True, grad_masks={"user_emb.weight": mask})
    after = model.user_emb.weight.detach()
    torch.testing.assert_close(after[0::2], before[0::2], rtol=0, atol=0)
    assert (after[1::2] - before[1::2]).abs().sum(1).min() > 0
    assert not model.item_emb.sparse  # the tables are dense again after training


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sampling", "sparse"),
    [
        (Sampling("popularity", 64), False),
        (Sampling("uniform", 32, mixed=True), True),
        (Sampling("in_batch"), True),
    ],
)
def test_sampled_softmax_beats_popularity_on_planted_tastes(
    sampling: Sampling, sparse: bool
) -> None:
    pairs = np.unique(synthetic_pairs(300, 200, 9_000, n_topics=8, seed=3), axis=0)
    rng = np.random.default_rng(0)
    held = rng.random(len(pairs)) < 0.2
    train, test = pairs[~held], pairs[held]
    counts = np.bincount(train[:, 1], minlength=200).astype(np.float32)
    pop = full_ranking(
        torch.ones(300, 1), torch.from_numpy(counts)[:, None], test, [train], ks=(10,)
    )["ndcg@10"]
    torch.manual_seed(0)
    model = TwoTower(300, 200, 16)
    _fit(model, train, epochs=10, lr=0.05, sampling=sampling, sparse_embeddings=sparse)
    with torch.no_grad():
        got = full_ranking(model.user_vectors(), model.item_vectors(), test, [train], ks=(10,))
    assert got["ndcg@10"] > 2 * pop, (got["ndcg@10"], pop)  # about 0.33 against 0.11


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--loss=sampled"], "loss: expected one of softmax, sampled_softmax, bpr"),
        (["--negative-sampler=zipf"], "negative_sampler: expected one of"),
        (
            ["--loss=sampled_softmax", "--negative-sampler=in_batch", "--mixed-negatives=true"],
            "mixed_negatives:",
        ),
        (["--loss=sampled_softmax", "--sampled-negatives=0"], "sampled_negatives: must be"),
        (["--sampler-alpha=1.5"], "sampler_alpha: must be in [0, 1]"),
        (["--sparse-embeddings=true"], "sparse_embeddings: the full softmax"),
        (["--temperature=0"], "temperature: must be positive"),
    ],
)
def test_sampling_settings_are_validated(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, overrides)


def test_valid_sampling_settings_load() -> None:
    cfg = load_config(
        None,
        [
            "--loss=sampled_softmax",
            "--negative-sampler=in_batch",
            "--sampled-negatives=0",
            "--sparse-embeddings=true",
        ],
    )
    assert (cfg.loss, cfg.negative_sampler, cfg.sparse_embeddings) == (
        "sampled_softmax",
        "in_batch",
        True,
    )


def _dense_sampled_softmax(
    u: torch.Tensor,
    pos_v: torch.Tensor,
    cand_v: torch.Tensor,
    log_expected: torch.Tensor,
    hits: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """The loss written out over the whole [B, C] score matrix."""
    pos = (u * pos_v).sum(-1) / temperature
    neg = ((u @ cand_v.T) / temperature - log_expected).masked_fill(hits, float("-inf"))
    return torch.logsumexp(torch.cat([pos.unsqueeze(1), neg], 1), 1) - pos


@pytest.mark.parametrize("block_bytes", [64, 1000, 2**20])
def test_blocked_loss_and_gradients_match_the_dense_formula(
    block_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Block by block (a single row per block up to the whole batch), with accidental hits given
    as a mask or as (rows, columns), and a row whose every candidate is its positive."""
    monkeypatch.setattr(model_module, "_BLOCK_BYTES", block_bytes)
    gen = torch.Generator().manual_seed(0)
    b, c, d = 70, 13, 5
    items = torch.randint(0, 9, (b,), generator=gen)
    cand = torch.randint(0, 9, (c,), generator=gen)
    cand[:] = torch.where(torch.arange(c) < 4, cand, cand[0])  # repeated candidates
    items[3] = cand[0]
    hits = items.unsqueeze(1) == cand.unsqueeze(0)
    hits[5] = True  # every candidate removed: the row's loss is 0
    weights = torch.rand(b, generator=gen, dtype=torch.float64)

    def inputs() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        shapes = [(b, d), (b, d), (c, d), (c,)]
        return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]

    for temperature in (1.0, 0.3):
        want_in, got_in = inputs(), inputs()
        want = _dense_sampled_softmax(*want_in, hits, temperature)
        (want * weights).sum().backward()
        for mask in (hits, hits.nonzero(as_tuple=True)):
            for t in got_in:
                t.grad = None
            got = sampled_softmax_loss(*got_in, mask, temperature)
            (got * weights).sum().backward()
            torch.testing.assert_close(got, want)
            assert float(got[5].detach()) == 0.0
            for g, w in zip(got_in, want_in, strict=True):
                torch.testing.assert_close(g.grad, w.grad)


def test_accidental_hits_by_search_match_the_comparison() -> None:
    gen = torch.Generator().manual_seed(0)
    items = torch.randint(0, 30, (500,), generator=gen)
    cand = torch.randint(0, 30, (40,), generator=gen)  # with repeats
    rows, cols = accidental_hits(items, cand)
    assert torch.equal(rows, rows.sort().values)
    got = torch.zeros(500, 40, dtype=torch.bool)
    got[rows, cols] = True
    assert rows.numel() == int(got.sum())  # no pair twice
    assert torch.equal(got, items.unsqueeze(1) == cand.unsqueeze(0))


def test_row_adam_moves_the_rows_as_sparse_adam_does() -> None:
    """The trainer's sparse-gradient Adam against torch.optim.SparseAdam over steps with
    repeated rows in a gradient, rows seen for the first time and rows left out."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(50, 4, generator=gen)
    ours, theirs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    opt_ours = _RowAdam([ours], lr=0.05)
    opt_theirs = torch.optim.SparseAdam([theirs], lr=0.05)
    for step in range(6):
        rows = torch.randint(0, 10 + 6 * step, (30,), generator=gen)  # rows 0 to 39
        values = torch.randn(30, 4, generator=gen)
        for p, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            p.grad = torch.sparse_coo_tensor(
                rows.unsqueeze(0), values, p.shape, check_invariants=True
            )
            opt.step()
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours.detach(), start)
    assert torch.equal(ours.detach()[40:], start[40:])  # never in a gradient: never moved

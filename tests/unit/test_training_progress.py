"""Progress output of training: one tqdm bar per phase on a terminal, none in logs."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch

from training.model import TwoTower
from training.trainer import fit


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _fit(epochs: int = 3, progress: bool = True) -> None:
    torch.manual_seed(0)
    model = TwoTower(6, 5, 4, 0, 0, 0.1, True)
    rng = np.random.default_rng(0)
    train = np.stack([rng.integers(0, 6, 40), rng.integers(0, 5, 40)], 1).astype(np.int64)
    scores = iter(np.linspace(0.1, 0.9, epochs).tolist())
    fit(
        model,
        train,
        lambda _m: next(scores),
        epochs=epochs,
        batch_size=8,
        lr=0.01,
        loss="bpr",
        reg=0.0,
        temperature=1.0,
        patience=10,
        eval_every=1,
        seed=0,
        device=torch.device("cpu"),
        desc="phase",
        progress=progress,
    )


def test_one_bar_per_phase_with_epochs_loss_and_validation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    _fit(epochs=3)
    out = term.getvalue()
    assert "phase: 100%" in out and "3/3" in out
    assert "epoch" in out and "loss=" in out and "valid=0.9000" in out
    assert "phase epoch" not in out  # no bar per epoch
    # one bar: every refresh rewrites the same line (carriage returns), one newline at the close
    assert out.count("\n") == 1


def test_no_bar_when_stderr_is_not_a_terminal_or_progress_is_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipe = io.StringIO()  # a log file, a Kubernetes Job's output
    monkeypatch.setattr(sys, "stderr", pipe)
    _fit()
    assert pipe.getvalue() == ""
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    _fit(progress=False)
    assert term.getvalue() == ""

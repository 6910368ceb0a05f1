"""The training command line: refused unknown names, --help from the config, the popularity gate."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.cli import main
from training.config import Config, field_help, load_config, option_name
from training.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC = REPO_ROOT / "training" / "configs" / "synthetic.toml"
QUICK = ["--threads=1", "--cold_shares=0", "--progress=false"]


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_unknown_toml_key_is_refused_with_the_nearest_name(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text("epoch = 3\n")
    with pytest.raises(ConfigError, match=r"unknown field 'epoch'; did you mean 'epochs'\?"):
        load_config(path, [])


def test_unknown_flag_exits_2_with_one_line_and_the_nearest_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["train", "--config", str(SYNTHETIC), "--epoch=3"]) == 2
    assert _one_line(capsys) == (
        "error: command line: unknown option --epoch; did you mean --epochs?"
    )
    # a typo in the underscore spelling and the space form is named in the dashed spelling
    assert main(["train", "--config", str(SYNTHETIC), "--rating_threshlod", "2"]) == 2
    assert "did you mean --rating-threshold?" in _one_line(capsys)


def test_train_help_lists_every_config_field_with_default_and_comment() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "training", "train", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    flat = " ".join(out.split())
    docs = field_help()
    for f in dataclasses.fields(Config):
        assert option_name(f.name) in out, f.name
        comment = docs[f.name][1]
        assert comment, f"{f.name} has no comment in training/config.py"
        assert " ".join(comment.split()) in flat, f.name
    assert "--epochs INT maximum epochs for target-domain training (default: 60)" in flat
    assert "--cold-shares A,B one run per share; the first share's models are the ones" in flat


def test_flags_from_help_reach_the_config(tmp_path: Path) -> None:
    cfg = load_config(SYNTHETIC, ["--epochs=7", "--progress=false", "--cold-shares=0.3"])
    assert (cfg.epochs, cfg.progress, cfg.cold_shares) == (7, False, [0.3])


def test_below_popularity_is_not_published_without_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # an untrained target-only model loses to popularity on validation
    weak = ["--export-strategy=target_only", "--strategies=", "--epochs=1", "--lr=1e-7"]
    weak += ["--baselines=popularity", "--ranker=dot", "--blend=false"]  # the gate alone
    repo = tmp_path / "repo"
    argv = ["train", f"--config={SYNTHETIC}", *QUICK, *weak, f"--repository={repo}"]
    assert main([*argv, f"--run-dir={tmp_path / 'a'}"]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1
    err = errors[0]
    assert "not above popularity's" in err and "nothing published" in err
    assert not repo.exists()
    first = (tmp_path / "a" / "results.md").read_text().splitlines()[0]
    assert first.startswith("**NOT PUBLISHED**: exported strategy target_only")

    assert main([*argv, f"--run-dir={tmp_path / 'b'}", "--allow-below-popularity"]) == 0
    assert (repo / "target-ranker" / "1").is_dir()
    first = (tmp_path / "b" / "results.md").read_text().splitlines()[0]
    assert first.startswith("**PUBLISHED BELOW POPULARITY**")
    out = capsys.readouterr().out
    assert "**PUBLISHED BELOW POPULARITY**" in out.strip().splitlines()[0]


def test_report_into_a_closed_pipe_ends_without_a_traceback(tmp_path: Path) -> None:
    # a report longer than a pipe buffer, read by a consumer that stops after one line
    strategies = {f"s{n}": {"warm": {"users": 1, "ndcg@10": 0.1}, "cold": {}} for n in range(3000)}
    results = {
        "dataset": "d",
        "source": "a",
        "target": "b",
        "protocol": "ratio",
        "shares": {"0.2": {"strategies": strategies}},
    }
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps(results))
    proc = subprocess.Popen(
        [sys.executable, "-m", "training", "report", str(run_dir)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"### d: a -> b")
    proc.stdout.close()  # what `| head -1` does
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def _pair(folder: Path, shared: bool, extra: str = "") -> Path:
    """A two-domain folder: 40 users per domain, sharing them all or none."""
    folder.mkdir()
    for name, offset in (("books", 0), ("films", 0 if shared else 1000)):
        rows = [
            f"u{u + offset},{name}{i},5"
            for u in range(40)
            for i in range(25)
            if (u * 7 + i) % 4 == 0
        ]
        (folder / f"{name}.csv").write_text("user_id,item_id,rating\n" + "\n".join(rows) + "\n")
    (folder / "dataset.toml").write_text(
        '[domains.books]\nfile = "books.csv"\nrating = "rating"\n'
        f'[domains.films]\nfile = "films.csv"\nrating = "rating"\n{extra}'
    )
    return folder


def test_pair_without_shared_users_exits_2_and_publishes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _pair(tmp_path / "apart", shared=False)
    repo = tmp_path / "repo"
    argv = ["train", f"--data-dir={tmp_path}", "--dataset=apart", "--source=films"]
    argv += ["--target=books", *QUICK, f"--repository={repo}", f"--run-dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "TRANSFER IMPOSSIBLE" in errors[0], errors
    assert "share no user" in errors[0]
    assert not repo.exists()


def test_typo_in_dataset_toml_exits_2_naming_the_nearest_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _pair(tmp_path / "typo", shared=True, extra='ratings = "stars"\n')
    argv = ["train", f"--data-dir={tmp_path}", "--dataset=typo", "--source=films"]
    assert main([*argv, "--target=books", *QUICK, f"--run-dir={tmp_path / 'run'}"]) == 2
    line = _one_line(capsys)
    assert "dataset.toml: unknown key 'ratings' in [domains.films]; did you mean 'rating'?" in line


def test_non_utf8_row_exits_2_with_one_line_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _pair(tmp_path / "latin", shared=True)
    with (folder / "books.csv").open("ab") as fh:
        fh.write(b"u1,caf\xe9,5\n")
    argv = ["train", f"--data-dir={tmp_path}", "--dataset=latin", "--source=films"]
    assert main([*argv, "--target=books", *QUICK, f"--run-dir={tmp_path / 'run'}"]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"error: {folder / 'books.csv'}:")
    assert "not utf-8 text (byte 0xe9" in line

"""Command line: ``python -m training`` / ``recsys-train``.

Subcommands:
  train     load, split, pretrain, transfer, baselines, evaluate, report, export and publish
  export    publish a run's checkpoint (it carries its config) to a model repository
  report    print the evaluation table of a run directory
  download  fetch MovieLens from GroupLens and verify its published MD5 (and a given SHA-256)
  prepare   map ids to codes and partition a data set by user on Ray Data (distributed)

Exit codes: 0 success, 2 bad usage, configuration or data (one line on stderr naming the file,
line or field).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from training.config import Config, field_help, format_default, option_name, suggest
from training.errors import ConfigError, TrainingError

CONFIG_DEST = "config."  # argparse destinations of the Config fields: "config.epochs", ...


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`Config` field, grouped by section, documented by its comment."""
    docs = field_help()
    groups: dict[str, argparse._ArgumentGroup] = {}
    defaults = Config()
    for f in dataclasses.fields(Config):
        section, comment = docs.get(f.name, ("", ""))
        title = f"training options: {section}" if section else "training options"
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        default = getattr(defaults, f.name)
        extra: dict[str, object] = {}
        if isinstance(default, bool):
            extra = {"nargs": "?", "const": "true", "metavar": "BOOL"}
        elif isinstance(default, list):
            extra = {"metavar": "A,B"}
        else:
            extra = {"metavar": type(default).__name__.upper()}
        text = f"{comment} (default: {format_default(default)})".strip()
        groups[title].add_argument(
            option_name(f.name),
            dest=CONFIG_DEST + f.name,
            default=argparse.SUPPRESS,
            help=text.replace("%", "%%"),
            **extra,  # type: ignore[arg-type]
        )


def _overrides(args: argparse.Namespace, extra: list[str], known: list[str]) -> list[str]:
    """``--key=value`` overrides from the options argparse read; anything else is refused."""
    for item in extra:
        if item.startswith("--"):
            name = item.partition("=")[0]
            raise ConfigError(f"command line: unknown option {name}{suggest(name, known, str)}")
    if extra:
        raise ConfigError(
            f"command line: unexpected argument {extra[0]!r} (options are --key=value)"
        )
    return [
        f"--{key[len(CONFIG_DEST) :]}={value}"
        for key, value in vars(args).items()
        if key.startswith(CONFIG_DEST)
    ]


def _normalise(argv: list[str]) -> list[str]:
    """``--cold_shares=0.2`` is accepted as ``--cold-shares=0.2``."""
    out = []
    for item in argv:
        if item.startswith("--"):
            key, sep, value = item.partition("=")
            item = key.replace("_", "-") + sep + value
        out.append(item)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recsys-train", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        parents=[common],
        allow_abbrev=False,  # "--epoch" is refused with "did you mean --epochs?", not guessed
        usage="%(prog)s [--config FILE] [--run-dir DIR] [--repository DIR] [--OPTION=VALUE ...]",
        help="full pipeline from a config file and --key=value overrides",
        description="Load, split, pretrain, transfer, evaluate, report, export and publish. "
        "Defaults, then the --config TOML file, then the options below (--key=value or "
        "--key value; --cold_shares is --cold-shares).",
    )
    t.add_argument("--config", type=Path, help="TOML override file (see training/configs/)")
    t.add_argument("--run-dir", type=Path, default=Path("runs/latest"), help="report folder")
    t.add_argument("--repository", type=Path, help="model repository to publish into")
    _add_config_options(t)
    e = sub.add_parser("export", parents=[common], help="export and publish a checkpoint")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--repository", type=Path, required=True)
    r = sub.add_parser(
        "report", parents=[common], help="print the evaluation table of a run directory"
    )
    r.add_argument("run_dir", type=Path)
    d = sub.add_parser(
        "download", parents=[common], help="download MovieLens from GroupLens (checksums verified)"
    )
    d.add_argument("name", choices=["ml-100k", "ml-1m"])
    d.add_argument("--dest", type=Path, required=True)
    d.add_argument("--sha256", help="also require this SHA-256 of the archive")
    pr = sub.add_parser(
        "prepare",
        parents=[common],
        help="map ids to codes and partition a data set by user (Ray Data)",
        description="Read a dataset.toml data set (Parquet, CSV, TSV) on Ray Data, de-duplicate it, "
        "map its ids to codes and write a prepared folder (per-domain Parquet partitions by "
        "user, the vocabularies, prepared.json) that --dataset and load_dataset read.",
    )
    pr.add_argument("--engine", choices=["ray"], default="ray", help="the engine (default: ray)")
    pr.add_argument("--dataset", type=Path, required=True, help="the data set folder to read")
    pr.add_argument("--out", type=Path, required=True, help="the new prepared folder to write")
    pr.add_argument(
        "--address", help="a running Ray cluster to use (default: start a local Ray instance)"
    )
    pr.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    pr.add_argument(
        "--object-store-mib",
        type=int,
        help="the local Ray instance's object store in MiB (default: Ray's, 30%% of the memory); "
        "it lives in /dev/shm, so keep it below that mount's size",
    )
    pr.add_argument(
        "--partitions", type=int, default=0, help="user partitions (default: one per 4 M rows)"
    )
    pr.add_argument(
        "--rating-threshold", type=float, help="keep ratings >= this only (default: keep all)"
    )
    return p


def parser_train(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``train`` subcommand's parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["train"]
    raise AssertionError("no train subcommand")


def _print_published(models: list[str], version: int, repository: Path) -> None:
    print(f"Published to model repository {repository}:")
    for m in models:
        print(f"  {m} version {version}")
    print(f"Published models: {', '.join(models)} version {version}")


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit code."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # inside the try: a reader that went away fails here, not at exit
        return code
    except BrokenPipeError:
        # the reader closed the pipe (``report ... | head``): stop quietly, as other tools do;
        # stdout goes to /dev/null so that the interpreter's last flush does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: list[str] | None) -> int:
    argv = _normalise(list(sys.argv[1:] if argv is None else argv))
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            from tqdm.contrib.logging import logging_redirect_tqdm

            from training.config import load_config
            from training.report import table
            from training.run import run

            known = [o for a in parser_train(parser)._actions for o in a.option_strings]
            cfg = load_config(args.config, _overrides(args, extra, known))
            data_dir = Path(cfg.data_dir) if cfg.data_dir else None
            with logging_redirect_tqdm():  # log lines above the progress bar, not through it
                results = run(cfg, data_dir, args.run_dir, args.repository)
            if "checkpoint" not in results:  # a non-zero DDP rank
                return 0
            print()
            print(table(results))
            print(f"Exported strategy: {results['exported_strategy']}")
            print(
                f"Total {results['seconds_total']:.1f}s, peak memory "
                f"{results['peak_memory_mb']:.0f} MB; report in {args.run_dir}"
            )
            if "published" in results:
                pub = results["published"]
                _print_published(pub["models"], pub["version"], Path(pub["repository"]))
            if "not_published" in results:
                raise TrainingError(results["not_published"])
            return 0
        if args.command == "export":
            import torch

            from training.export_onnx import publish

            if not args.checkpoint.is_file():
                raise TrainingError(f"checkpoint not found: {args.checkpoint}")
            ckpt = torch.load(args.checkpoint, weights_only=False)
            version = publish(ckpt, args.repository, int(ckpt["config"]["seed"]))
            target = ckpt["target"]
            _print_published([f"{target}-ranker", f"{target}-retrieval"], version, args.repository)
            return 0
        if args.command == "report":
            from training.report import table

            path = args.run_dir / "results.json"
            if not path.is_file():
                raise TrainingError(f"no results.json in {args.run_dir}")
            print(table(json.loads(path.read_text())))
            return 0
        if args.command == "download":
            from training.data.download import download_movielens

            out = download_movielens(args.name, args.dest, expected_sha256=args.sha256)
            print(f"Downloaded and verified {args.name} into {out}")
            return 0
        if args.command == "prepare":
            from training.data import distributed

            started = distributed.connect(args.address, args.num_cpus, args.object_store_mib)
            try:
                manifest = distributed.prepare(
                    args.dataset, args.out, args.partitions, args.rating_threshold
                )
            finally:
                if started:
                    distributed.disconnect()
            for name, info in manifest["domains"].items():
                s = info["stats"]
                print(
                    f"{name}: {s['rows']:,} rows, {s['unique_pairs']:,} unique pairs, "
                    f"{info['items']:,} items, {len(info['files'])} partitions"
                )
            print(
                f"Prepared {manifest['dataset']} ({manifest['users']:,} users) into {args.out} "
                f"in {manifest['seconds']:.1f}s on Ray {manifest['engine_version']}"
            )
            return 0
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``python -m training`` / ``recsys-train``.

Subcommands:
  train     load, split, pretrain, transfer, baselines, evaluate, report, export and publish
  export    publish a run's checkpoint (it carries its config) to a model repository
  report    print the evaluation table of a run directory
  download  fetch MovieLens from GroupLens and verify its published MD5 (and a given SHA-256)

Exit codes: 0 success, 2 bad usage, configuration or data (one line on stderr naming the file,
line or field).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from training.errors import TrainingError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recsys-train", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train", parents=[common], help="full pipeline from a config file and --key=value overrides"
    )
    t.add_argument("--config", type=Path, help="TOML override file (see training/configs/)")
    t.add_argument("--data-dir", type=Path, help="data folder (default ../shared/data)")
    t.add_argument("--run-dir", type=Path, default=Path("runs/latest"))
    t.add_argument("--repository", type=Path, help="model repository to publish into")
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
    return p


def _print_published(models: list[str], version: int, repository: Path) -> None:
    print(f"Published to model repository {repository}:")
    for m in models:
        print(f"  {m} version {version}")
    print(f"Published models: {', '.join(models)} version {version}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --key=value overrides for train are everything argparse does not know
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
            from training.config import load_config
            from training.pipeline import run
            from training.report import table

            bad = [x for x in extra if not x.startswith("--") or "=" not in x]
            if bad:
                parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides are --key=value)")
            cfg = load_config(args.config, extra)
            results = run(cfg, args.data_dir, args.run_dir, args.repository)
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
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""Write bench/results/images.{json,md} from one `make images-smoke` run (scripts/images-smoke.sh)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path


def _seconds(value: str) -> float | None:
    return None if value in ("", "null") else float(value)


def _engine_version(engine: str) -> str:
    try:
        out = subprocess.run([engine, "--version"], capture_output=True, text=True, timeout=30)
    except OSError:
        return engine
    return out.stdout.strip() or engine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cold", type=Path, required=True)
    parser.add_argument("--cached", type=Path, required=True)
    parser.add_argument("--smoke", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--status", type=int, required=True)
    parser.add_argument("--base-s", default="null")
    parser.add_argument("--wheelhouse-s", default="null")
    parser.add_argument("--out", type=Path, required=True, help="path without the suffix")
    args = parser.parse_args()
    cold = json.loads(args.cold.read_text())
    cached = json.loads(args.cached.read_text()) if args.cached.is_file() else {}
    smoke = json.loads(args.smoke.read_text()) if args.smoke.is_file() else {}
    lines = [
        line.removeprefix("images-smoke: ")
        for line in args.log.read_text().splitlines()
        if line.startswith("images-smoke: ") and not line.startswith("images-smoke: ---")
    ]
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "engine": _engine_version(cold["engine"]),
        "base": cold["base"],
        "base_size_bytes": cold["base_size_bytes"],
        "base_build_s": _seconds(args.base_s),
        "wheelhouse_s": _seconds(args.wheelhouse_s),
        "images": {
            target: {
                "image": cold[target]["image"],
                "size_bytes": cold[target]["size_bytes"],
                "build_cold_s": cold[target]["build_s"],
                "build_cached_s": cached[target]["build_s"] if cached else None,
            }
            for target in ("serving", "training")
        },
        "smoke": {"passed": args.status == 0, **smoke, "output": lines},
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    def mb(n: int) -> str:
        return f"{n / 1e6:,.0f} MB"

    def s(x: float | None) -> str:
        return "—" if x is None else f"{x:.0f} s"

    md = [
        "# Container images: sizes, build times, smoke",
        "",
        f"`make images-smoke` on {result['date']}: {result['machine']}, {result['engine']}, "
        f"base `{result['base']}` ({mb(result['base_size_bytes'])}"
        + (f", made in {s(result['base_build_s'])}" if result["base_build_s"] else "")
        + "). Builds run with `--network none` from the wheelhouse"
        + (f" (downloaded in {s(result['wheelhouse_s'])})" if result["wheelhouse_s"] else "")
        + ". Cold: an empty layer cache (base image and wheelhouse present; the training build reuses the dependency layer the serving build just made, as in `make images`); cached: the same tree again.",
        "",
        "| image | size | build, cold | build, cached |",
        "| --- | ---: | ---: | ---: |",
    ]
    for target, image in result["images"].items():
        md.append(
            f"| {target} (`{image['image']}`) | {mb(image['size_bytes'])} | "
            f"{s(image['build_cold_s'])} | {s(image['build_cached_s'])} |"
        )
    md += [
        "",
        f"Smoke: **{'passed' if args.status == 0 else 'FAILED'}**"
        + (f"; training {s(smoke.get('train_s'))}" if "train_s" in smoke else "")
        + (f", data preparation on Ray {s(smoke.get('prepare_s'))}" if "prepare_s" in smoke else "")
        + ". Its output:",
        "",
        "```",
        *lines,
        "```",
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

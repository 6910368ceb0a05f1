"""Run reports: JSON, a Markdown table and a PNG chart putting every strategy beside the baselines."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

COLUMNS = ("ndcg@10", "recall@10", "hit@10", "mrr@10", "ndcg@20", "recall@20")
SHORT = ("NDCG@10", "R@10", "HR@10", "MRR@10", "NDCG@20", "R@20")


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.4f}"
    return str(x)


def headline(results: dict[str, Any]) -> str | None:
    """The report's first line when the exported model is not above popularity on validation."""
    gate = results.get("popularity_gate") or {}
    if "not_published" in results:
        return f"**NOT PUBLISHED**: {results['not_published']}"
    if not gate.get("below_popularity"):
        return None
    if "published" in results:
        return f"**PUBLISHED BELOW POPULARITY** (allow_below_popularity = true): {gate['message']}"
    return f"**BELOW POPULARITY**: {gate['message']}"


def table(results: dict[str, Any]) -> str:
    """Markdown tables: one per cold-start share, warm and cold-start users side by side."""
    lines: list[str] = []
    first = headline(results)
    if first:
        lines += [first, ""]
    for share, block in results["shares"].items():
        lines.append(
            f"### {results['dataset']}: {results['source'] or '-'} -> {results['target']}, "
            f"protocol {results['protocol']}, cold-start share {share}"
        )
        lines.append("")
        head = ["strategy", "users"] + [f"warm {s}" for s in SHORT[:4]]
        has_cold = any(r.get("cold") for r in block["strategies"].values())
        if has_cold:
            head += ["cold users"] + [f"cold {s}" for s in SHORT[:4]]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for name, r in block["strategies"].items():
            warm = r["warm"]
            row = [name, _fmt(warm.get("users", 0))] + [
                _fmt(warm.get(c, float("nan"))) for c in COLUMNS[:4]
            ]
            if has_cold:
                cold = r.get("cold") or {}
                row += [_fmt(cold.get("users", 0))] + [
                    _fmt(cold.get(c, float("nan"))) for c in COLUMNS[:4]
                ]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def write_report(results: dict[str, Any], run_dir: Path) -> list[Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = [run_dir / "results.json", run_dir / "results.md", run_dir / "results.png"]
    paths[0].write_text(json.dumps(results, indent=1, default=str))
    paths[1].write_text(table(results) + "\n")
    chart(results, paths[2])
    return paths


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = list(results["shares"])
    fig, axes = plt.subplots(1, len(shares), figsize=(6 * len(shares), 4), squeeze=False)
    for ax, share in zip(axes[0], shares, strict=True):
        block = results["shares"][share]["strategies"]
        names = list(block)
        warm = [block[n]["warm"].get("ndcg@10", 0.0) for n in names]
        cold = [(block[n].get("cold") or {}).get("ndcg@10", 0.0) for n in names]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], warm, width=0.4, label="warm")
        ax.bar([i + 0.2 for i in x], cold, width=0.4, label="cold-start")
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("NDCG@10")
        ax.set_title(f"{results['source'] or '-'} -> {results['target']}, cold share {share}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

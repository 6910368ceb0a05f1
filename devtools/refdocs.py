"""Generate docs/settings.md and docs/metrics.md from the settings classes and metric objects.

    python -m devtools.refdocs            # write both files (`make docs`)
    python -m devtools.refdocs --check    # exit 1 naming the files that differ from the code

The settings tables come from the pydantic-settings classes (field, environment variable, flag,
type and bounds, default, description); the metric tables from the prometheus_client objects
(name as exported, type, labels, help, histogram buckets). Nothing in these two files is typed
by hand, so they cannot disagree with the code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from annotated_types import Ge, Gt, Le, Lt
from prometheus_client.metrics import MetricWrapperBase
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
SETTINGS_DOC = Path("docs/settings.md")
METRICS_DOC = Path("docs/metrics.md")
MIB = 1024 * 1024


@dataclass(frozen=True)
class Service:
    """One service: how it is started, its settings class, the modules defining its metrics."""

    title: str
    command: str
    settings: str  # "module:Class"
    metrics: str  # module


SERVICES = [
    Service(
        "Ranking service", "python -m serving.ranking", "serving.ranking.config:RankingSettings",
        "serving.ranking.metrics",
    ),
    Service(
        "Retrieval service", "python -m serving.retrieval",
        "serving.retrieval.config:RetrievalSettings", "serving.retrieval.metrics",
    ),
    Service("Gateway", "python -m gateway", "gateway.config:GatewaySettings", "gateway.metrics"),
]  # fmt: skip
COMMON_SETTINGS = "recsys.rpc.settings:ServerSettings"
COMMON_METRICS = "recsys.rpc.metrics"


def _load(spec: str) -> type[BaseSettings]:
    module, _, name = spec.partition(":")
    cls = getattr(importlib.import_module(module), name)
    assert isinstance(cls, type) and issubclass(cls, BaseSettings), spec
    return cls


# ------------------------------------------------------------------------------------ settings


def env_prefix(cls: type[BaseSettings]) -> str:
    return str(cls.model_config.get("env_prefix", ""))


def env_var(prefix: str, name: str) -> str:
    """The environment variable of a field (pydantic-settings: prefix + name, case-insensitive)."""
    return f"{prefix}{name.upper()}"


def flag(name: str, annotation: object) -> str:
    """The command-line flag of a field (kebab case; booleans are implicit flags)."""
    kebab = name.replace("_", "-")
    if annotation is bool:
        return f"`--{kebab}`, `--no-{kebab}`"
    return f"`--{kebab}=…`"


def _type_name(annotation: object) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(f"`{v}`" for v in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return " | ".join(_type_name(a) for a in args)
    names = {int: "integer", float: "number", str: "text", bool: "boolean", Path: "path"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))  # type: ignore[call-overload]


def _bounds(info: FieldInfo) -> str:
    low = high = ""
    for item in info.metadata:
        if isinstance(item, Ge):
            low = f"≥ {item.ge}"
        elif isinstance(item, Gt):
            low = f"> {item.gt}"
        elif isinstance(item, Le):
            high = f"≤ {item.le}"
        elif isinstance(item, Lt):
            high = f"< {item.lt}"
    return ", ".join(part for part in (low, high) if part)


def type_text(info: FieldInfo) -> str:
    text = _type_name(info.annotation)
    bounds = _bounds(info)
    return f"{text}, {bounds}" if bounds else text


def default_text(info: FieldInfo) -> str:
    value = info.default
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "":
        return "empty"
    if isinstance(value, int) and value >= MIB and value % MIB == 0:
        return f"`{value}` ({value // MIB} MiB)"
    return f"`{value}`"


def _cell(text: str) -> str:
    """Text for a Markdown table cell: one line, pipes escaped, no HTML tags."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text.replace("<", "&lt;").replace(">", "&gt;")


def own_fields(cls: type[BaseSettings], base: type[BaseSettings] | None) -> list[str]:
    """The fields `cls` declares itself (new ones, and those it overrides, e.g. its ports)."""
    if base is None:
        return list(cls.model_fields)
    declared = set(vars(cls).get("__annotations__", {}))
    return [name for name in cls.model_fields if name in declared]


def settings_table(
    cls: type[BaseSettings], names: list[str], per_service: set[str], prefix: str | None = None
) -> list[str]:
    prefix = env_prefix(cls) if prefix is None else prefix
    lines = [
        "| setting | environment variable | flag | type | default | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        info = cls.model_fields[name]
        default = "per service" if name in per_service else default_text(info)
        lines.append(
            f"| `{name}` | `{env_var(prefix, name)}` | {flag(name, info.annotation)} | "
            f"{_cell(type_text(info))} | {default} | {_cell(info.description or '')} |"
        )
    return lines


def missing_descriptions() -> list[str]:
    """Fields without a description (the generated reference would have an empty cell)."""
    missing = []
    for spec in [COMMON_SETTINGS, *(s.settings for s in SERVICES)]:
        cls = _load(spec)
        missing += [f"{spec}.{n}" for n, f in cls.model_fields.items() if not f.description]
    return missing


def render_settings() -> str:
    common = _load(COMMON_SETTINGS)
    classes = [(service, _load(service.settings)) for service in SERVICES]
    own = {n for _, cls in classes for n in own_fields(cls, common)}
    overridden = [n for n in common.model_fields if n in own]
    prefixes = ", ".join(f"`{env_prefix(cls)}`" for _, cls in classes)
    out = [
        "# Settings",
        "",
        "<!-- Generated by `make docs` (python -m devtools.refdocs) from the settings classes;",
        "     do not edit: tests/unit/test_refdocs.py fails when this file and the code differ. -->",
        "",
        "Every service reads its settings at start from environment variables with its prefix",
        f"({prefixes}) and from `--key=value` flags; a flag wins over the variable. Values are",
        "validated before anything starts: a bad one exits with code 2 and a message naming the",
        "field, its variable and its flag. Boolean flags also have a `--no-` form.",
        "",
        "## Every service",
        "",
        f"`{COMMON_SETTINGS.replace(':', '.')}`, shared by all three services; in the variable "
        f"names `*_` stands for the service's prefix ({prefixes}).",
        "",
    ]
    ports = ", ".join(
        f"{s.title.lower()} " + "/".join(str(cls.model_fields[p].default) for p in overridden)
        for s, cls in classes
    )
    out += settings_table(common, own_fields(common, None), set(overridden), prefix="*_")
    out += [
        "",
        f"Per service ({', '.join(f'`{n}`' for n in overridden)}): {ports}.",
    ]
    for service, cls in classes:
        out += [
            "",
            f"## {service.title}",
            "",
            f"`{service.command}`: `{service.settings.replace(':', '.')}`, "
            f"variables `{env_prefix(cls)}*`. Also every setting above.",
            "",
            *settings_table(cls, own_fields(cls, common), set()),
        ]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------- metrics


def module_metrics(module_name: str) -> list[MetricWrapperBase]:
    """The metric objects a module defines at top level, in definition order."""
    module = importlib.import_module(module_name)
    return [v for v in vars(module).values() if isinstance(v, MetricWrapperBase)]


def exported_name(metric: MetricWrapperBase) -> str:
    """The name a query uses: counters gain `_total`, info metrics `_info`."""
    kind, name = str(metric._type), str(metric._name)
    return {"counter": f"{name}_total", "info": f"{name}_info"}.get(kind, name)


def _type_cell(metric: MetricWrapperBase) -> str:
    if metric._type == "histogram":
        return "histogram (`_bucket`, `_sum`, `_count`)"
    return str(metric._type)


def _buckets(metric: MetricWrapperBase) -> tuple[float, ...]:
    return tuple(b for b in metric._upper_bounds if b != float("inf"))  # type: ignore[attr-defined]


def _num(value: float) -> str:
    return f"{value:g}"


def metrics_table(metrics: list[MetricWrapperBase]) -> list[str]:
    lines = ["| metric | type | labels | help |", "|---|---|---|---|"]
    for m in metrics:
        labels = ", ".join(f"`{label}`" for label in m._labelnames) or "none"
        lines.append(
            f"| `{exported_name(m)}` | {_type_cell(m)} | {labels} | {_cell(m._documentation)} |"
        )
    return lines


def render_metrics() -> str:
    sections = [("Every service", COMMON_METRICS, "the shared kit, in every service")]
    sections += [(s.title, s.metrics, f"`{s.command}`") for s in SERVICES]
    out = [
        "# Metrics",
        "",
        "<!-- Generated by `make docs` (python -m devtools.refdocs) from the metric definitions;",
        "     do not edit: tests/unit/test_refdocs.py fails when this file and the code differ. -->",
        "",
        "Each service serves Prometheus text on its own HTTP port (`metrics_port`, see",
        "[settings.md](settings.md)) at `/metrics`. What the label values mean and example queries:",
        "[operations.md](operations.md#metrics).",
    ]
    bucket_sets: dict[tuple[float, ...], list[str]] = {}
    for title, module, note in sections:
        metrics = module_metrics(module)
        out += ["", f"## {title}", "", f"`{module}` ({note}).", "", *metrics_table(metrics)]
        for m in metrics:
            if m._type == "histogram":
                bucket_sets.setdefault(_buckets(m), []).append(exported_name(m))
    out += ["", "## Histogram buckets", "", "Upper bounds of the cumulative buckets (`le`).", ""]
    for bounds, names in bucket_sets.items():
        out.append(f"- {', '.join(f'`{n}`' for n in names)}: {', '.join(map(_num, bounds))}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------- main


def generated() -> dict[Path, str]:
    """Each generated file (relative to the repository root) and the text it must hold."""
    return {SETTINGS_DOC: render_settings(), METRICS_DOC: render_metrics()}


def stale(root: Path | None = None) -> list[Path]:
    """The generated files whose committed text differs from what the code gives now."""
    root = REPO_ROOT if root is None else root
    out = []
    for rel, text in generated().items():
        path = root / rel
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            out.append(rel)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.refdocs", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the files are out of date")
    args = parser.parse_args(argv)
    missing = missing_descriptions()
    if missing:
        sys.stderr.write(f"settings without Field(description=...): {', '.join(missing)}\n")
        return 2
    if args.check:
        paths = stale()
        for rel in paths:
            sys.stderr.write(f"{rel} is out of date: run `make docs`\n")
        return 1 if paths else 0
    for rel, text in generated().items():
        (REPO_ROOT / rel).parent.mkdir(parents=True, exist_ok=True)
        (REPO_ROOT / rel).write_text(text, encoding="utf-8")
        sys.stdout.write(f"wrote {rel}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

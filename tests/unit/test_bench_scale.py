"""bench-scale end to end at a tiny size: every stage in its own process, results merged."""

from __future__ import annotations

import json
from pathlib import Path

from bench import scale


def test_sizes_parse_and_print() -> None:
    assert [scale.parse_size(s) for s in ("1M", "10M", "100M", "20k", "1500")] == [
        10**6,
        10**7,
        10**8,
        20_000,
        1500,
    ]
    assert [scale.size_name(n) for n in (10**6, 10**8, 20_000, 1500)] == [
        "1M",
        "100M",
        "20k",
        "1500",
    ]


def test_every_stage_reports_time_throughput_and_memory(tmp_path: Path) -> None:
    work, results = tmp_path / "work", tmp_path / "results"
    common = ["--work-dir", str(work), "--results", str(results)]
    assert scale.main(["--sizes", "5k,10k", "--stages", "generate,load,split", *common]) == 0
    result = json.loads((results / "scale.json").read_text())
    rows = {(r["size"], r["stage"]): r for r in result["rows"]}
    assert set(rows) == {(s, st) for s in ("5k", "10k") for st in ("generate", "load", "split")}
    for r in rows.values():
        assert r["rc"] == 0 and r["stage_s"] > 0 and r["rows_per_s"] > 0 and r["peak_rss_mb"] > 0
    assert rows[("10k", "load")]["rows"] == 10_000
    assert rows[("10k", "split")]["users"] == 200  # one user per 50 interactions
    assert {(g["stage"], g["from"], g["to"]) for g in result["growth"]} == {
        (st, "5k", "10k") for st in ("generate", "load", "split")
    }
    assert not (work / "5k").exists()  # generated data removed after its size
    # a size run again replaces its rows and keeps the others; the train stage, capped
    train = ["--set", "loss=bpr", "--set", "threads=1", "--train-pairs", "5k=300"]
    assert scale.main(["--sizes", "5k", *train, *common]) == 0
    again = json.loads((results / "scale.json").read_text())
    rows = {(r["size"], r["stage"]): r for r in again["rows"]}
    assert len(again["rows"]) == 7 and rows[("5k", "train-epoch")]["epoch_pairs"] == 300
    assert (
        rows[("5k", "train-epoch")]["train_pairs"] > 300 and rows[("5k", "train-epoch")]["rc"] == 0
    )
    md = (results / "scale.md").read_text()
    assert "| 5k | train-epoch |" in md and "capped: fewer steps" in md and "loss=bpr" in md


def test_prepare_ray_stage_reports_the_driver_and_its_ray_processes(tmp_path: Path) -> None:
    work, results = tmp_path / "work", tmp_path / "results"
    common = ["--work-dir", str(work), "--results", str(results), "--ray-cpus", "1"]
    stages = "generate,prepare-ray,prepare-ray-csv"
    assert scale.main(["--sizes", "5k", "--stages", stages, *common]) == 0
    rows = {r["stage"]: r for r in json.loads((results / "scale.json").read_text())["rows"]}
    r = rows["prepare-ray"]
    # the same rows read from CSV: the same de-duplicated pairs and users
    text = rows["prepare-ray-csv"]
    assert text["rc"] == 0 and text["input_mb"] > 0 and text["rows"] == 5000
    assert (text["unique_pairs"], text["users"]) == (r["unique_pairs"], r["users"])
    assert not (work / "5k-csv").exists()  # removed with the generated data
    assert r["rc"] == 0 and r["rows"] == 5000 and r["stage_s"] > 0 and r["ray_cpus"] == 1
    assert r["loaded_pairs"] == r["unique_pairs"] < 5000  # the prepared folder loads back
    # the Ray processes (at least the raylet, the GCS and one worker) count beside the driver
    assert r["processes"] >= 4 and r["peak_rss_mb"] == r["peak_tree_mb"] > r["driver_peak_mb"] > 0
    md = (results / "scale.md").read_text()
    assert "| 5k | prepare-ray |" in md and "Ray Data on 1 CPU (+" in md
    assert "| 5k | prepare-ray-csv |" in md and "MiB of CSV" in md

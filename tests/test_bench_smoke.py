"""The GPU benchmark script runs end to end on the CPU with its tiny config (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_train.py"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_bench_prints_a_row_per_setting_with_finite_numbers(bench, tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = bench.main(["--tiny", "--steps", "2", "--json", str(out)])
    table = capsys.readouterr().out

    assert [r.setting for r in rows] == bench.DEFAULT_SETTINGS
    table_rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| setting")]
    table_rows = [line for line in table_rows if not line.startswith("| ---")]
    assert [line.split("|")[1].strip() for line in table_rows] == bench.DEFAULT_SETTINGS
    assert table.rstrip().splitlines()[-1] == table_rows[-1]  # the table comes last
    for row in rows:
        assert len(row.step_times) == 2
        for value in (row.s_per_step, row.floor_fraction, row.planner_peak_gib, row.planner_s_per_step, row.first_loss):
            assert math.isfinite(value) and value > 0, (row.setting, value)
        assert row.peak_allocated_gib is None  # the CPU has no allocator statistics; shown as "-"
    # One seed, one batch size: every strategy starts from the same loss (fp8 rounds the weights).
    batch1 = {r.setting: r.first_loss for r in rows if r.batch == 1}
    for name, loss in batch1.items():
        assert math.isclose(loss, batch1["plain"], rel_tol=1e-3 if name == "fp8" else 1e-5), name
    saved = json.loads(out.read_text())
    assert [r["setting"] for r in saved["rows"]] == bench.DEFAULT_SETTINGS


def test_unknown_setting_is_refused(bench):
    with pytest.raises(SystemExit, match="unknown setting"):
        bench.parse_setting("plain+fast")


def test_a_failing_setting_costs_only_its_own_row(bench, monkeypatch, capsys):
    real_run = bench.Bench.run

    def run(self, name):
        if name == "gc":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_run(self, name)

    monkeypatch.setattr(bench.Bench, "run", run)
    rows = bench.main(["--tiny", "--steps", "1", "--settings", "plain,gc,unsloth"])
    assert [r.setting for r in rows] == ["plain", "unsloth"]
    assert "gc: FAILED" in capsys.readouterr().err


def load_script(monkeypatch, name):
    spec = importlib.util.spec_from_file_location(name, BENCH.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_real_size_script_trains_saves_and_checks_through_the_cli(monkeypatch, tmp_path):
    """The GPU end-to-end script's own path on the tiny model: a run through the command line in two buckets,
    started by torchrun (one process in a gloo group: the multi-process path), previews, the post-save
    self-check and lora-info's ComfyUI verdict all read back from the run's files."""
    script = load_script(monkeypatch, "real_size_run")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result, full = script.main(["--tiny", "--root", str(tmp_path), "--steps", "2", "--per-bucket", "1",
                                "--variants", "swap18,full_fused_swap14", "--launchers", "torchrun"])
    assert result["returncode"] == 0, result["output_tail"]
    assert result["variant"] == "swap18-torchrun" and result["process_group"] == "gloo"
    assert result["run_end"]["status"] == "finished" and result["run_end"]["floor_fraction"] > 0
    assert result["step_events"] == 2
    assert any("2 bucket(s)" in line for line in result["log"])
    assert len(result["previews"]) == 2
    assert "self-check ok" in result["self_check"][0]
    assert result["lora_info"] == ["ComfyUI would load every key."]
    # full fine-tuning with the fused backward pass and block swap: the released model file, checked
    assert full["returncode"] == 0, full["output_tail"]
    assert full["run_end"]["status"] == "finished" and full["step_events"] == 2
    assert "the released layout, equal to the trained weights" in full["self_check"][0]


def test_data_bench_keeps_each_phases_fastest_run_and_refuses_skipped_images(monkeypatch, tmp_path):
    """bench_data's --repeat merge (fastest time, highest RSS, the slowest run kept beside it) and its guard
    against rates per image that the scan never placed."""
    script = load_script(monkeypatch, "bench_data")

    def run(seconds, peak, growth):
        return {"n": 10, "rss_growth_gib": growth, "phases": [
            {"phase": "scan", "seconds": seconds, "images_per_s": 10 / seconds, "peak_rss_gib": peak}]}

    merged = script.fastest([run(2.0, 0.5, 0.1), run(1.0, 0.3, 0.2), run(4.0, 0.4, 0.1)])
    (scan,) = merged["phases"]
    assert (scan["seconds"], scan["images_per_s"], scan["peak_rss_gib"], scan["slowest_s"]) == (1.0, 10.0, 0.5, 4.0)
    assert merged["repeats"] == 3 and merged["rss_growth_gib"] == 0.2

    script.make_dataset(tmp_path, 8, 1024)  # at 1024 the bench once lost half its shapes below the smallest bucket
    from anima_core.data import DataOptions, build_training_data

    data_dir, opts = script.prepare(DataOptions, tmp_path, 8, 1024, 2)
    data = build_training_data(opts, base_dir=data_dir)
    script.every_image_placed(data, 8)
    with pytest.raises(SystemExit, match="only 8 of the 9 images"):
        script.every_image_placed(data, 9)

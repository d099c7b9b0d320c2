"""benchmarks/gpu_check.py works before a GPU is ever lent: its --tiny mode runs every
step on CPU (tiny ELECTRA, synthetic reviews) and writes the results file."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


def test_gpu_check_tiny_mode_runs_every_step_on_cpu(tiny_model_dir, sentiment_dir, tmp_path):
    pytest.importorskip("accelerate", reason="the Trainer baseline needs accelerate")
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny",
                           "--model", str(tiny_model_dir), "--dataset", str(sentiment_dir),
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["machine"]["device"] == "cpu" and results["machine"]["torch"]
    ours = results["ours"]
    assert 0.0 <= ours["accuracy"] <= 1.0
    assert ours["train_reviews_per_s"] > 0 and ours["eval_reviews_per_s"] > 0
    assert ours["wall_s"] > 0 and ours["mfu_peak_tflops_assumed"] == 0.14
    assert 0 < ours["mfu"] < 1 and ours["train_gflop_per_review"] > 0
    assert results["trainer_grouped"]["train_samples_per_s"] > 0
    assert results["ours_over_trainer"]["train"] == pytest.approx(
        ours["train_reviews_per_s"] / results["trainer_grouped"]["train_samples_per_s"])
    assert "ddp" not in results  # no GPUs: no scaling step
    for step in ("== a) machine", "== b) finetune_electra.py", "== c) Trainer baseline"):
        assert step in proc.stdout

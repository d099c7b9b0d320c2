"""benchmarks/gpu_check.py works before a GPU is ever lent: its --tiny mode runs every
part on CPU (tiny ELECTRA, synthetic reviews) and writes the results file."""

import json
import subprocess
import sys

import pytest

import finetune_electra as fe
from conftest import HANG, ROOT


@pytest.mark.skipif(fe.TORCH_VERSION < (2, 4), reason="benchmarks/gpu_check.py runs on GPU machines "
                    "with a recent torch, never with the IPU host's torch 2.0.1 (issue 39: CI time)")
def test_gpu_check_tiny_mode_runs_every_part_on_cpu(tiny_model_dir, sentiment_dir, tmp_path):
    pytest.importorskip("accelerate", reason="the Trainer baseline needs accelerate")
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny",
                           "--model", str(tiny_model_dir), "--dataset", str(sentiment_dir),
                           "--out", str(out)], capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["machine"]["device"] == "cpu" and results["machine"]["torch"]
    parts = results["parts"]
    assert list(parts) == ["cuda_tests", "ours", "trainer_fp32", "trainer_bf16", "ours_packed",
                           "ours_base_size", "ours_fp32", "ours_base_size_packed", "ours_eager",
                           "ours_linear_clipped"]
    assert results["args"]["peak_source"] == "this CPU's measured fp32 matmul peak"
    assert parts["cuda_tests"]["exit_code"] == 0 and "skipped" in parts["cuda_tests"]["summary"]
    for name, part in parts.items():
        if name == "cuda_tests":
            continue
        assert 0.0 <= part["accuracy"] <= 1.0, name
        assert part["train_reviews_per_s"] > 0 and part["eval_reviews_per_s"] > 0, name
        assert part["wall_s"] > 0 and 0 < part["mfu"] < 1, name
    ours = parts["ours"]
    assert ours["steps"] == "eager (CPU: the host runs the kernels itself)"
    assert ours["warmup_s"] == 0 and ours["train_gflop_per_review"] > 0
    assert parts["ours_base_size"]["train_gflop_per_review"] > ours["train_gflop_per_review"]
    faster = max(parts["trainer_fp32"], parts["trainer_bf16"], key=lambda r: r["train_reviews_per_s"])
    assert results["ours_over_faster_trainer"]["train"] == pytest.approx(
        ours["train_reviews_per_s"] / faster["train_reviews_per_s"])
    assert "| ours_packed |" in proc.stdout and "ours / faster Trainer" in proc.stdout


def test_mfu_takes_the_cards_own_dense_peak():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check
    assert gpu_check.card_peak("NVIDIA H200")[0] == 989
    assert gpu_check.card_peak("NVIDIA H100 80GB HBM3")[0] == 989
    assert gpu_check.card_peak("NVIDIA H100 PCIe")[0] == 756
    assert gpu_check.card_peak("NVIDIA A100-SXM4-80GB")[0] == 312
    assert gpu_check.card_peak("Tesla T4")[0] == 65
    assert "datasheet" in gpu_check.card_peak("NVIDIA H200")[1]
    assert gpu_check.card_peak("Some Future GPU") is None

"""Does the script learn? Tiny ELECTRA on learnable synthetic data, and the real
pretrained MiniLM on a slice of the real IMDB."""

import json

import pytest

import finetune_electra as fe
from conftest import IMDB_DIR, assert_learned, minilm_dir, run_args


def test_tiny_electra_learns_synthetic_sentiment_through_the_cli(tiny_model_dir, sentiment_dir,
                                                                 tmp_path):
    out = tmp_path / "run"
    metrics = fe.main(run_args(tiny_model_dir, sentiment_dir, out, "--epochs", "3"))
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert_learned(metrics)
    state = json.loads((fe.list_checkpoints(out)[-1] / "state.json").read_text())
    curve = [loss for _, loss, *_ in state["loss_curve"]]  # one reading every --log-every steps
    assert len(curve) == 3 * 50 // 10
    assert sum(curve[-3:]) < 0.5 * sum(curve[:3])
    written = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert written == metrics
    for key in ("train_loss", "accuracy", "train_samples_per_s", "eval_samples_per_s", "seconds"):
        assert all(m[key] > 0 for m in written)
    args = json.loads((out / "args.json").read_text())
    assert args["lr"] == 1e-3 and args["epochs"] == 3 and args["device"] == "cpu"


@pytest.mark.skipif(not (IMDB_DIR / "train.parquet").exists(), reason=f"IMDB not found in {IMDB_DIR}")
def test_pretrained_minilm_learns_real_imdb(tmp_path, capsys):
    metrics = fe.main([
        "--model", str(minilm_dir()), "--dataset", str(IMDB_DIR), "--label-names", "neg,pos",
        "--train-samples", "800", "--eval-samples", "400", "--max-length", "128",
        "--batch-size", "16", "--lr", "5e-5", "--epochs", "1", "--device", "cpu",
        "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "labels: 0=neg, 1=pos" in out and "Accuracy: " in out
    # Chance is 0.5 on this balanced slice. One epoch of 50 steps: over seeds 42, 1, 2 it
    # gave 0.79, 0.67, 0.81 (the same with 1 thread), so the bound sits below the worst.
    assert metrics[0]["accuracy"] > 0.6


def test_tiny_electra_learns_through_the_ipu_flow_on_the_standin(fake_poptorch, tiny_model_dir,
                                                                 sentiment_dir, tmp_path):
    """The IPU flow (against the PopTorch stand-in, not an IPU): 2 stages, host batches of
    8 x 2 device iterations x 3 accumulated, 16 optimizer steps of 24 reviews per epoch."""
    metrics = fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path, "--device", "ipu",
                               "--ipus", "2", "--device-iterations", "2", "--epochs", "5",
                               "--log-every", "4"))
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5]
    assert_learned(metrics)

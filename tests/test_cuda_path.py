"""What of the fast CUDA path runs on a CPU: no host sync in a train step, the losses read
every --log-every steps, the eager fallback when capturing CUDA graphs fails, padding
buckets, and no dependence on datasets' torch/numpy formatters (tests/test_cuda_graphs.py
covers the graphs themselves, on a GPU)."""

import json
import sys
import types
from collections import Counter

import pytest
import torch

import finetune_electra as fe
from conftest import cli_error, run_args, summary_of, tiny_electra

SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")


def count_host_reads(monkeypatch):
    """Count the calls that make a host wait for a device, by the file that made them."""
    calls = Counter()
    for name in SYNCS:
        method = getattr(torch.Tensor, name)

        def counted(self, *args, _method=method, **kwargs):
            calls[sys._getframe(1).f_code.co_filename.rsplit("/", 2)[-2:][-1]] += 1
            return _method(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_a_train_step_reads_nothing_back_from_the_device(monkeypatch):
    """Before: two host reads a step (the finite check, float(loss)). Now none in this
    script's code, and none in the optimizer's: the step is skipped on the device.
    (transformers' own mask check reads once per eager forward; under a CUDA graph it
    sees the capture and skips the check.) Without a fused AdamW (torch < 2.4 on CPU)
    the skip flag is read on the host: one read, free on a CPU."""
    torch.manual_seed(0)
    model = tiny_electra()
    optimizer = fe.adamw(model.parameters(), 1e-3, torch.device("cpu"))
    train_step, _ = fe.torch_steps(model, model, optimizer, fe.parse_args([]), torch.device("cpu"),
                                   2, None, fe.Ranks())
    batch = {"input_ids": torch.randint(1000, 2000, (8, 32)),
             "attention_mask": torch.ones(8, 32, dtype=torch.long),
             "labels": torch.randint(0, 2, (8,))}
    calls = count_host_reads(monkeypatch)
    losses = [train_step(batch) for _ in range(3)]
    if optimizer.defaults.get("fused"):
        assert calls["finetune_electra.py"] == 0
        assert not any(name.startswith(("optimizer", "adam")) for name in calls)
    else:  # torch's own unfused AdamW reads its step counts on the host too
        assert calls["finetune_electra.py"] == 3
    monkeypatch.undo()
    assert all(loss.shape == () for loss in losses) and losses[2] < losses[0]


def test_losses_are_read_every_log_every_steps_and_at_the_epoch_end(tiny_model_dir, sentiment_dir,
                                                                    tmp_path, monkeypatch):
    readings = []
    steps_done = fe.Run.steps_done

    def record(run, losses, samples, updates_applied=False):
        readings.append((run.state["global_step"], len(losses), run.progress.bar.n))
        steps_done(run, losses, samples, updates_applied)

    monkeypatch.setattr(fe.Run, "steps_done", record)
    fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path, "--log-every", "20",
                     "--save-every", "30"))
    # 50 steps an epoch: read at 20, 30 (a checkpoint), 40, 50 (the epoch's end), 60, ...
    assert [step + n for step, n, _ in readings] == [20, 30, 40, 50, 60, 80, 90, 100]
    # The bar counted each step as it ran, before its loss was read (issue 36: it sat at 0
    # between readings), and after epoch 1 the evaluation's 4 batches (200 reviews, 64 each).
    assert all(bar == step + n + 4 * (step >= 50) for step, n, bar in readings)


def test_a_failed_capture_falls_back_to_eager_steps_with_one_warning(
        tiny_model_dir, sentiment_dir, tmp_path, monkeypatch, capsys):
    """Forced on a CPU, capturing fails (no CUDA here): the run goes on eagerly and gives
    exactly the run without graphs."""
    plain = fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path / "plain", "--epochs", "1"))
    capsys.readouterr()
    monkeypatch.setattr(fe, "use_cuda_graphs", lambda *_: True)
    fell_back = fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path / "graphs", "--epochs", "1"))
    out, err = capsys.readouterr()
    warnings = [line for line in (out + err).splitlines() if line.startswith("warning: capturing")]
    assert len(warnings) == 1 and "every step runs eagerly instead" in warnings[0]
    assert summary_of(out)["train and eval steps"].startswith("eager (capturing CUDA graphs failed:")
    curve = [json.loads((tmp_path / run / "loss_curve.json").read_text()) for run in ("plain", "graphs")]
    assert curve[0] == curve[1] and plain[0]["accuracy"] == fell_back[0]["accuracy"]


def test_cpu_summary_says_eager_and_float32(tiny_model_dir, sentiment_dir, tmp_path, capsys):
    fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path, "--epochs", "1"))
    summary = summary_of(capsys.readouterr().out)
    assert summary["train and eval steps"] == "eager (CPU: the host runs the kernels itself)"
    assert summary["precision"] == "float32" and summary["padding"] == "dynamic, at most 64 tokens"


def test_cuda_graphs_yes_without_cuda_is_one_error_line(tiny_model_dir, sentiment_dir, tmp_path,
                                                        capsys):
    error = cli_error(capsys, run_args(tiny_model_dir, sentiment_dir, tmp_path, "--cuda-graphs", "yes"))
    assert error == ("error: --cuda-graphs yes needs one process on CUDA with static shapes "
                     "(--padding buckets, max_length or packed)")


def test_buckets_pad_each_batch_to_a_multiple_of_64_tokens():
    rows = [{"input_ids": torch.ones(n, dtype=torch.long), "attention_mask": torch.ones(n, dtype=torch.long),
             "labels": torch.tensor(0)} for n in (3, 70)]
    batch = fe.pad_collate(0, fe.BUCKET)(rows)
    assert batch["input_ids"].shape == (2, 128) and batch["attention_mask"].sum() == 73
    assert fe.pad_collate(0)(rows)["input_ids"].shape == (2, 70)


def test_auto_padding_is_buckets_on_cuda_and_dynamic_on_cpu():
    for device, padding in (("cuda", "buckets"), ("cpu", "dynamic")):
        args = fe.parse_args([])
        args.device = device
        assert fe.choose_padding(args, static=False) == padding
        assert fe.choose_padding(args, static=True) == "max_length"


def test_bucket_padding_is_masked_out(tiny_model_dir):
    """The tokens added up to a multiple of 64 change no logit."""
    model, _ = fe.load_model(str(tiny_model_dir), ["0", "1"])
    rows = [{"input_ids": torch.randint(1000, 2000, (n,)), "attention_mask": torch.ones(n, dtype=torch.long),
             "labels": torch.tensor(0)} for n in (9, 30)]
    with torch.no_grad():
        logits = [model.eval()(**{k: v for k, v in fe.pad_collate(0, multiple)(rows).items()
                                  if k != "labels"}).logits for multiple in (1, fe.BUCKET)]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-6)


def test_no_datasets_formatter_runs_so_a_torchvision_without_videoreader_is_harmless(
        tiny_model_dir, sentiment_dir, tmp_path, monkeypatch):
    """datasets 4.0's torch and numpy formatters import torchvision.io.VideoReader whenever
    torchvision is loaded; current torchvision has none. Nothing here goes through them."""
    import datasets
    stub, stub_io = types.ModuleType("torchvision"), types.ModuleType("torchvision.io")
    stub.io = stub_io
    monkeypatch.setitem(sys.modules, "torchvision", stub)
    monkeypatch.setitem(sys.modules, "torchvision.io", stub_io)
    monkeypatch.setattr(datasets.config, "TORCHVISION_AVAILABLE", True, raising=False)
    for padding in ("dynamic", "packed"):
        metrics = fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path / padding,
                                   "--epochs", "1", "--padding", padding))
        assert 0 <= metrics[0]["accuracy"] <= 1

"""Nothing silent (issue 28): what a newcomer's first runs print and leave behind tells the
truth: the summary and the bar one story, a line per epoch, a loss curve for any run
length, one line for the new head, every flag documented, a resume that finishes what was
asked, a failed start that leaves nothing."""

import json
import signal
import subprocess
import sys

from safetensors.torch import load_file, save_file

import finetune_electra as fe
from conftest import HANG, ROOT, epochs_done, minilm_dir, run_args, summary_of, tiny_electra

SCRIPT = str(ROOT / "finetune_electra.py")


def test_summary_bar_and_epoch_lines_tell_one_story(capsys, tiny_model_dir, sentiment_dir,
                                                    tmp_path):
    """60 reviews, 8 a step: 7 steps and 4 reviews left out; 32 eval reviews in 1 batch."""
    out = tmp_path / "run"
    fe.main(run_args(tiny_model_dir, sentiment_dir, out, "--epochs", "2", "--train-samples", "60",
                     "--eval-samples", "32", "--log-every", "5"))
    printed = capsys.readouterr()
    summary = summary_of(printed.out)
    assert summary["gradient accumulation"] == "1 micro-batch per optimizer step"
    assert summary["micro-batch"] == "8 samples"
    assert summary["left out each epoch"] == ("4 samples of 60, too few for a whole optimizer "
                                              "step (drop_last); a new shuffle picks them each epoch")
    assert summary["progress bar"] == ("one for the run: 14 optimizer steps and 1 eval batch "
                                       "per evaluation")
    # the bar's total is that story: 2 x (7 + 1)
    assert "16/16 [" in printed.err and "/18 [" not in printed.err
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [line for line in printed.out.splitlines() if line.startswith("Accuracy: ")]
    assert lines == [f"Accuracy: {m['accuracy']:.3f}  (epoch {m['epoch']} of 2: train loss "
                     f"{m['train_loss']:.4f}, {m['train_samples_per_s']:,.1f} train samples/s)"
                     for m in metrics]
    # readings every 5 steps of the run, and each epoch's last steps: 5, 7 | 10, 14
    curve = json.loads((out / "loss_curve.json").read_text())
    assert [step for step, *_ in curve] == [5, 7, 10, 14]


def test_a_four_step_run_has_a_loss_curve(tiny_model_dir, sentiment_dir, tmp_path):
    """Before: loss_curve.json was [] (fewer steps than --log-every), the plot empty."""
    out = tmp_path / "run"
    fe.main(run_args(tiny_model_dir, sentiment_dir, out, "--epochs", "1", "--train-samples", "32",
                     "--eval-samples", "16"))
    curve = json.loads((out / "loss_curve.json").read_text())
    assert [step for step, *_ in curve] == [4] and 0 < curve[0][1] < 2


def test_the_new_head_is_one_line_not_a_load_report(capfd):
    lines = []
    fe.load_model(str(minilm_dir()), ["neg", "pos"], say=lines.append)
    assert lines == ["new classification head: classifier.* (2 labels), initialised randomly"]
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "MISSING" not in err and "newly initialized" not in err


def test_an_encoder_weight_missing_from_the_checkpoint_is_a_warning(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    tiny_electra().save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).write_bytes((tiny_model_dir / name).read_bytes())
    weights = load_file(model_dir / "model.safetensors")
    del weights["electra.encoder.layer.0.output.dense.bias"]
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    lines = []
    fe.load_model(str(model_dir), ["neg", "pos"], say=lines.append)
    assert lines == ["warning: 1 weights of the encoder are not in the checkpoint and were "
                     "initialised randomly: electra.encoder.layer.0.output.dense.bias"]


def test_help_documents_every_flag_and_each_default_once():
    parser = fe.build_parser()
    undocumented = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert undocumented == []
    text = parser.format_help()
    assert "(default: None)" not in text and "default: runs/<timestamp> (default" not in text
    for action in parser._actions:
        described = (parser._get_formatter()._get_help_string(action) or "").replace(
            "%(default)s", "")
        assert described.count("default") <= 1, action.option_strings


def test_a_failed_start_leaves_runs_as_it_was(capsys, monkeypatch, tiny_model_dir, tmp_path):
    """Before: every failed start (a typo'd --dataset) left runs/<timestamp>/ with args.json."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "earlier").mkdir(parents=True)
    for dataset in ("./no-such-data", str(tmp_path / "runs")):  # missing; no data files
        assert fe.cli(["--model", str(tiny_model_dir), "--dataset", dataset, "--device", "cpu"]) == 2
    assert "error: " in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["earlier"]


def test_ctrl_c_after_a_resume_that_added_an_epoch_resumes_to_the_end(tiny_model_dir,
                                                                       sentiment_dir, tmp_path):
    """Before: the printed `--resume DIR` went back to the run's first --epochs 1, trained
    nothing, and wrote no epoch-2 metrics."""
    out = tmp_path / "run"
    fe.main(run_args(tiny_model_dir, sentiment_dir, out, "--epochs", "1", "--batch-size", "4",
                     "--save-every", "10"))
    proc = subprocess.Popen([sys.executable, SCRIPT, "--resume", str(out), "--epochs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = fe.list_checkpoints(out)[-1]
    while fe.list_checkpoints(out)[-1] == first:  # a checkpoint in epoch 2
        assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=HANG)
    assert proc.returncode == 130, stderr[-2000:]
    command = stdout.split("resume with: ")[1].splitlines()[0]
    assert command == f"python {SCRIPT} --resume {out}"
    resumed = subprocess.run([sys.executable, *command.split()[1:]], capture_output=True,
                             text=True, timeout=HANG)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [m["epoch"] for m in epochs_done(out)] == [1, 2]
    assert "Accuracy: " in resumed.stdout and "(epoch 2 of 2:" in resumed.stdout


def test_no_hub_fails_in_seconds_with_one_line(capsys, monkeypatch, tmp_path):
    """Before: six retries, 38 s of 'Retrying in Ns', then the line. The hub is made
    unreachable here by pointing the hub client at a closed local port (no real network)."""
    import time
    import huggingface_hub.constants
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    code = fe.cli(["--device", "cpu"])
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines() == [
        "error: could not load dataset 'imdb' from the Hugging Face Hub (no connection to "
        "127.0.0.1:9: Connection refused); no network? pass a local copy with --model PATH (a "
        "save_pretrained dir) and --dataset PATH (save_to_disk dir, parquet/csv/json files, or "
        "aclImdb); for a copy in the Hugging Face cache, set HF_HUB_OFFLINE=1"]
    assert not (tmp_path / "runs").exists()

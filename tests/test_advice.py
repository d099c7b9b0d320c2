"""No dead ends (issue 31): every message that advises a command, and that command, run in
the state that printed the message, working. One test per advice; each follows the advice
literally where the message spells the command out.

Advice covered elsewhere, by tests that run the advised command:
  `resume with: python ... --resume DIR` (Ctrl-C)       test_checkpoints: test_ctrl_c_saves_...
  `resume it as it ran, with torchrun ...`                test_torchrun: ..._refused_with_the_command_that_works
  `resume with: torchrun ...` (a torchrun run stopped)    test_torchrun: test_a_stopped_torchrun_run_...
  `(--resume puts that run back)`, `--overwrite replaces it`  test_output_dir
"""

import json
import shlex
import shutil

import pytest

import finetune_electra as fe
from conftest import cli_error, epochs_done, poisoned_forward, run_args, sentiment_frame

QUICK = ["--epochs", "1", "--train-samples", "64", "--eval-samples", "32"]
# The PopTorch stand-in (not an IPU): host batch 1 x 4 device iterations x 7 accumulated
IPU_QUICK = ["--device", "ipu", "--batch-size", "1", "--device-iterations", "4",
             "--max-length", "32", *QUICK]


def follow(capsys, argv):
    """Run the advised command: it must end well (exit code 0, no error line)."""
    code = fe.cli([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0 and "error:" not in captured.err, captured.err[-2000:]
    return captured.out


def flags_after(text, marker):
    """The command-line words the message gives after `marker` (up to a ';', ')' or ',')."""
    rest = text.split(marker, 1)[1]
    for end in ";),":
        rest = rest.split(end)[0]
    return shlex.split(rest)


@pytest.fixture(scope="module")
def finished(tiny_model_dir, sentiment_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    fe.main(run_args(tiny_model_dir, sentiment_dir, out, *QUICK, "--save-every", "3"))
    return out


@pytest.fixture
def unfinished(finished, tmp_path):
    """The finished run as it was when killed mid-epoch: step 6 of 8, no model, no metrics."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "model")
    (out / "metrics.jsonl").write_text("")
    for checkpoint in fe.list_checkpoints(out):
        if checkpoint.name.endswith("-end"):
            shutil.rmtree(checkpoint)
    return out


# --- the output directory and resuming -------------------------------------------------------

def test_a_held_unfinished_run_continue_it_with_resume(capsys, unfinished, tiny_model_dir,
                                                        sentiment_dir):
    err = cli_error(capsys, run_args(tiny_model_dir, sentiment_dir, unfinished, *QUICK))
    assert f"holds an unfinished run: 0 of 1 epochs done, newest checkpoint step-00000006" in err
    out = follow(capsys, flags_after(err, "continue it with "))
    assert "resumed from" in out and "(epoch 1, step 6)" in out
    assert len(epochs_done(unfinished)) == 1 and (unfinished / "model").is_dir()


def test_resume_with_another_model_resume_it_without_model(capsys, unfinished, tmp_path):
    err = cli_error(capsys, ["--resume", str(unfinished), "--model", str(tmp_path)])
    assert err.endswith("resume it without --model")
    assert "resumed from" in follow(capsys, ["--resume", unfinished])


def test_resume_that_changes_the_checkpoints_meaning_resume_with_the_runs_own(capsys, unfinished,
                                                                              tmp_path):
    err = cli_error(capsys, ["--resume", str(unfinished), "--batch-size", "2"])
    assert "resume with the run's own settings, or start a new run in a new --output-dir" in err
    assert "resumed from" in follow(capsys, ["--resume", unfinished])
    args = json.loads((unfinished / "args.json").read_text())
    follow(capsys, ["--model", args["model"], "--dataset", args["dataset"], *QUICK, "--device",
                    "cpu", "--max-length", "64", "--batch-size", "2",
                    "--output-dir", tmp_path / "new"])


def test_a_finished_run_resumed_pass_epochs_to_train_one_more(capsys, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    model_before = (out / "model" / "model.safetensors").read_bytes()
    said = follow(capsys, ["--resume", out])
    assert said.startswith(f"{out} holds a finished run (1 of 1 epochs, accuracy ")
    assert not (out / "resumes.jsonl").exists()  # nothing on disk changed
    assert (out / "model" / "model.safetensors").read_bytes() == model_before
    follow(capsys, ["--resume", out, *flags_after(said, "nothing to resume; pass ")[:2]])
    assert [m["epoch"] for m in epochs_done(out)] == [1, 2]


def test_an_ipu_checkpoint_resume_it_with_device_ipu(capsys, fake_poptorch, tiny_model_dir,
                                                      sentiment_dir, tmp_path):
    out = tmp_path / "ipu"
    follow(capsys, run_args(tiny_model_dir, sentiment_dir, out, *IPU_QUICK))
    err = cli_error(capsys, ["--resume", str(out), "--device", "cpu", "--epochs", "2"])
    assert "resume it with --device ipu" in err
    follow(capsys, ["--resume", out, "--epochs", "2", "--device", "ipu"])
    assert [m["epoch"] for m in epochs_done(out)] == [1, 2]


def test_overwrite_with_resume_give_one_of_them(capsys, unfinished):
    err = cli_error(capsys, ["--resume", str(unfinished), "--overwrite"])
    assert err.endswith("give one of them")
    assert "resumed from" in follow(capsys, ["--resume", unfinished])


def test_a_non_finite_loss_lower_lr_or_skip_and_resume(capsys, monkeypatch, tiny_model_dir,
                                                       sentiment_dir, tmp_path):
    """The run stops, saving its last good weights: resuming with either advice goes on."""
    poisoned_forward(monkeypatch, bad_call=5)  # the resumed runs' calls come later: finite
    out = tmp_path / "run"
    assert fe.cli(run_args(tiny_model_dir, sentiment_dir, out, *QUICK)) == 2
    err = capsys.readouterr().err
    assert "the loss became nan at epoch 1, step 5" in err
    assert "Lower --lr, or pass --on-nan skip" in err
    for advice in (["--on-nan", "skip"], ["--lr", "1e-4"]):
        again = tmp_path / advice[0].strip("-")
        shutil.copytree(out, again)
        assert "resumed from" in follow(capsys, ["--resume", again, *advice])
        assert len(epochs_done(again)) == 1


def test_runs_full_of_one_timestamp_use_output_dir(capsys, monkeypatch, tiny_model_dir,
                                                   sentiment_dir, tmp_path):
    import datetime

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 2, 0, 0, 0)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fe, "datetime", Frozen)
    for n in range(1, 1000):
        (tmp_path / "runs" / ("20261202-000000" + (f"-{n}" if n > 1 else ""))).mkdir(parents=True)
    argv = [str(a) for a in run_args(tiny_model_dir, sentiment_dir, "x", *QUICK)]
    at = argv.index("--output-dir")
    argv = argv[:at] + argv[at + 2:]
    err = cli_error(capsys, argv)
    assert err == "error: runs/ holds 999 runs named 20261202-000000: use --output-dir"
    follow(capsys, [*argv, "--output-dir", tmp_path / "mine"])


# --- data and model --------------------------------------------------------------------------

def test_offline_pass_local_copies(capsys, monkeypatch, tiny_model_dir, sentiment_dir, tmp_path):
    monkeypatch.setattr(fe, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(
        ConnectionError("no network")))
    err = cli_error(capsys, ["--output-dir", str(tmp_path / "a"), "--device", "cpu"])
    assert "pass a local copy with --model PATH (a save_pretrained dir) and --dataset PATH" in err
    monkeypatch.undo()
    follow(capsys, run_args(tiny_model_dir, sentiment_dir, tmp_path / "b", *QUICK))


def test_a_missing_column_use_text_column(capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 64), ("test", 32)):
        sentiment_frame(n, seed=n).rename(columns={"text": "review"}).to_parquet(
            data / f"{split}.parquet")
    err = cli_error(capsys, run_args(tiny_model_dir, data, tmp_path / "a", *QUICK))
    assert "column 'text' not in the train split; its columns are: review, label" in err
    follow(capsys, run_args(tiny_model_dir, data, tmp_path / "b", *QUICK, "--text-column", "review"))


def test_a_text_column_that_is_not_text_names_the_columns_of_text(capsys, tiny_model_dir,
                                                                  tmp_path):
    """Before: a traceback from inside transformers, and an args.json left behind."""
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 64), ("test", 32)):
        frame = sentiment_frame(n, seed=n)
        frame.insert(0, "id", range(n))
        frame.to_parquet(data / f"{split}.parquet")
    err = cli_error(capsys, run_args(tiny_model_dir, data, tmp_path / "a", *QUICK,
                                     "--text-column", "id"))
    assert err == ("error: --text-column id: in the train split it holds int64, not text; "
                   "columns of text: text")
    assert not (tmp_path / "a").exists()  # refused before anything is written
    follow(capsys, run_args(tiny_model_dir, data, tmp_path / "b", *QUICK, "--text-column",
                            err.rsplit(": ", 1)[1]))


def test_label_names_give_exactly_these(capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 64), ("test", 32)):
        frame = sentiment_frame(n, seed=n)
        frame["label"] = frame["label"].map({0: "negative", 1: "positive"})
        frame.to_csv(data / f"{split}.csv", index=False)
    err = cli_error(capsys, run_args(tiny_model_dir, data, tmp_path / "a", *QUICK,
                                     "--label-names", "neg,pos"))
    names = err.split("the data's labels are ")[1].split(";")[0]
    out = follow(capsys, run_args(tiny_model_dir, data, tmp_path / "b", *QUICK,
                                  "--label-names", names))
    assert "labels: 0=negative, 1=positive" in out


def test_a_max_length_too_long_use_that_or_less(capsys, tiny_model_dir, sentiment_dir, tmp_path):
    err = cli_error(capsys, run_args(tiny_model_dir, sentiment_dir, tmp_path / "a", *QUICK,
                                     "--max-length", "1000"))
    assert "this model takes at most 128 tokens; use that or less" in err
    follow(capsys, run_args(tiny_model_dir, sentiment_dir, tmp_path / "b", *QUICK,
                            "--max-length", "128"))


def test_too_few_samples_for_a_step_use_a_smaller_batch(capsys, tiny_model_dir, sentiment_dir,
                                                       tmp_path):
    err = cli_error(capsys, run_args(tiny_model_dir, sentiment_dir, tmp_path / "a", *QUICK,
                                     "--train-samples", "6"))
    assert "the train split has 6 samples, fewer than one optimizer step's batch (8)" in err
    assert err.endswith("use more data or a smaller batch")
    follow(capsys, run_args(tiny_model_dir, sentiment_dir, tmp_path / "b", *QUICK,
                            "--train-samples", "6", "--batch-size", "2"))


def test_a_model_packing_cannot_take_use_padding_max_length(capsys, tiny_model_dir,
                                                            sentiment_dir, tmp_path):
    from transformers import AutoTokenizer
    from test_families import tiny_classifier
    tiny_classifier("deberta-v2", conv_kernel_size=3).save_pretrained(tmp_path / "deberta")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "deberta")
    err = cli_error(capsys, run_args(tmp_path / "deberta", sentiment_dir, tmp_path / "a", *QUICK,
                                     "--padding", "packed"))
    follow(capsys, run_args(tmp_path / "deberta", sentiment_dir, tmp_path / "b", *QUICK,
                            *flags_after(err, "use ")))


def test_poptorch_that_will_not_import_pass_device_cpu(capsys, monkeypatch, tiny_model_dir,
                                                       sentiment_dir, tmp_path):
    monkeypatch.setattr(fe, "POPTORCH_REFUSED", "PopTorch 3.4 needs torch 2.0.1")
    argv = run_args(tiny_model_dir, sentiment_dir, tmp_path / "a", *QUICK)
    argv.remove("--device")
    argv.remove("cpu")
    err = cli_error(capsys, argv)
    assert err.endswith("or pass --device cpu or cuda")
    follow(capsys, [*argv, "--device", "cpu"])


# --- IPU (the PopTorch stand-in, not an IPU) ---------------------------------------------------

def test_more_ipus_than_layers_use_the_power_of_two_it_names(capsys, fake_poptorch, tiny_model_dir,
                                                            sentiment_dir, tmp_path):
    err = cli_error(capsys, run_args(tiny_model_dir, sentiment_dir, tmp_path / "a", *IPU_QUICK,
                                     "--ipus", "8", "--device-iterations", "8"))
    assert "use --ipus 5 or fewer (on IPUs a power of two: 4 or fewer)" in err
    follow(capsys, run_args(tiny_model_dir, sentiment_dir, tmp_path / "b", *IPU_QUICK,
                            "--ipus", err.split("power of two: ")[1].split()[0]))


def test_ipus_not_a_power_of_two_use_one_that_is(capsys, fake_poptorch, tiny_model_dir,
                                                 sentiment_dir, tmp_path):
    err = cli_error(capsys, run_args(tiny_model_dir, sentiment_dir, tmp_path / "a", *IPU_QUICK,
                                     "--ipus", "3"))
    assert "so use stage and replica counts of 1, 2, 4, 8 or 16" in err
    follow(capsys, run_args(tiny_model_dir, sentiment_dir, tmp_path / "b", *IPU_QUICK,
                            "--ipus", "2"))


def test_device_iterations_that_cannot_fill_the_pipeline_use_at_least(
        capsys, fake_poptorch, tiny_model_dir, sentiment_dir, tmp_path):
    err = cli_error(capsys, run_args(tiny_model_dir, sentiment_dir, tmp_path / "a", *IPU_QUICK,
                                     "--device-iterations", "2"))
    assert err.endswith("cannot fill a 4-stage pipeline: use at least 4")
    follow(capsys, run_args(tiny_model_dir, sentiment_dir, tmp_path / "b", *IPU_QUICK,
                            "--device-iterations", err.rsplit(" ", 1)[1]))


# --- prediction ----------------------------------------------------------------------------------

def test_predict_takes_what_its_message_names(capsys, finished, unfinished, tmp_path):
    """--predict of something that is not a model names three things that work: a run's
    model/, one of its checkpoints (an interrupted run has no model/), the run itself."""
    err = cli_error(capsys, ["--predict", str(tmp_path), "a wonderful film"])
    assert "use <output-dir>/model from a training run, one of its " \
           "<output-dir>/checkpoints/step-*, or the output directory" in err
    for model in (finished / "model", fe.list_checkpoints(unfinished)[-1], unfinished, finished):
        label, prob, text = follow(capsys, ["--predict", model, "a wonderful film"]).split("\t")
        assert label in ("0", "1") and 0.5 <= float(prob) <= 1 and text == "a wonderful film\n"
    err = cli_error(capsys, ["a wonderful film", "--output-dir", str(tmp_path / "x")])
    assert err.endswith("need --predict MODEL_DIR")
    follow(capsys, ["--predict", finished / "model", "a wonderful film"])


def test_a_checkpoint_predicts_as_its_weights_do(capsys, unfinished):
    """The checkpoint's model.safetensors is what from_pretrained loads: the same logits."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    checkpoint = fe.list_checkpoints(unfinished)[-1]
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    weights = load_file(checkpoint / "model.safetensors")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(checkpoint)("a film")["input_ids"][0] == 101  # [CLS]

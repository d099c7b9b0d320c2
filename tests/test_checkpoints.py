"""Nothing lost: checkpoints, resume after a kill or Ctrl-C, bad numbers, predict, plot."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import finetune_electra as fe
from conftest import (HANG, ROOT, cli_error, poisoned_forward, run_args,
                      sentiment_frame)

SCRIPT = str(ROOT / "finetune_electra.py")


def final_weights(run_dir):
    return load_file(run_dir / "model" / "model.safetensors")


def assert_same_run(a, b):
    metrics_a = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    metrics_b = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [m["accuracy"] for m in metrics_a] == [m["accuracy"] for m in metrics_b]
    assert [m["train_loss"] for m in metrics_a] == pytest.approx(
        [m["train_loss"] for m in metrics_b], rel=1e-5)
    weights_a, weights_b = final_weights(a), final_weights(b)
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], rtol=1e-5, atol=1e-6)


def start(argv):
    return subprocess.Popen([sys.executable, SCRIPT, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc, run_dir, timeout=HANG):
    deadline = time.time() + timeout
    while not fe.list_checkpoints(run_dir):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    return fe.list_checkpoints(run_dir)[0]


@pytest.fixture(scope="module")
def unbroken(tiny_model_dir, sentiment_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("unbroken")
    fe.main(run_args(tiny_model_dir, sentiment_dir, out, "--batch-size", "4", "--save-every", "10"))
    return out


def test_sigkill_mid_epoch_then_resume_matches_an_unbroken_run(unbroken, tiny_model_dir,
                                                               sentiment_dir, tmp_path):
    out = tmp_path / "killed"
    proc = start(run_args(tiny_model_dir, sentiment_dir, out, "--batch-size", "4", "--save-every", "10"))
    first = wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = json.loads((first / "state.json").read_text())
    assert state["epoch"] == 0 and state["step"] == 10  # killed mid-epoch, 100 steps per epoch
    assert not (out / "model").exists()
    resumed = subprocess.run([sys.executable, SCRIPT, "--resume", str(out)],
                             capture_output=True, text=True, timeout=HANG)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert_same_run(unbroken, out)


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(unbroken, tiny_model_dir,
                                                          sentiment_dir, tmp_path):
    out = tmp_path / "interrupted"
    proc = start(run_args(tiny_model_dir, sentiment_dir, out, "--batch-size", "4", "--save-every", "10"))
    wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=HANG)
    assert proc.returncode == 130, stderr[-2000:]
    assert f"resume with: python {SCRIPT} --resume {out}" in stdout
    assert "Traceback" not in stderr
    resumed = subprocess.run([sys.executable, SCRIPT, "--resume", str(out)],
                             capture_output=True, text=True, timeout=HANG)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(unbroken, out)


def test_a_checkpoint_killed_mid_write_leaves_the_previous_one(unbroken, monkeypatch, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(unbroken, out)
    before = fe.list_checkpoints(out)
    model, _ = fe.load_model(str(out / "model"), ["0", "1"])
    optimizer = fe.adamw(fe.decay_groups(model, 0.01), 1e-3,
                         torch.device("cpu"))  # as the run built its own
    state, _ = fe.load_checkpoint(out, fe.TrainedState(model, optimizer))

    def dies_mid_write(tensors, path, metadata=None):
        path.write_bytes(b"partial")
        raise KeyboardInterrupt  # the process is gone at this point

    monkeypatch.setattr(fe, "save_file", dies_mid_write)
    state["global_step"] += 1
    with pytest.raises(KeyboardInterrupt):
        fe.save_checkpoint(out, fe.TrainedState(model, optimizer).snapshot(), state, keep=2)
    assert fe.list_checkpoints(out) == before  # the half-written one is not listed
    name = f"step-{state['global_step']:08d}" + ("" if state["step"] else "-end")
    assert (out / "checkpoints" / f".{name}.tmp").exists()
    restored, path = fe.load_checkpoint(out, fe.TrainedState(model, optimizer))
    assert path == before[-1] and restored["global_step"] == state["global_step"] - 1


def test_keep_prunes_old_checkpoints_and_state_is_json_and_safetensors(unbroken):
    checkpoints = fe.list_checkpoints(unbroken)
    # 100 steps per epoch, --save-every 10, --keep 2: step 190, and 200 at the epoch's end
    # (once: before issue 36 step 200 was kept twice, mid-epoch and as the epoch's end)
    assert [c.name for c in checkpoints] == ["step-00000190", "step-00000200-end"]
    # a model directory too (config and tokenizer): --predict takes a checkpoint (issue 31)
    names = {p.name for p in checkpoints[-1].iterdir()}
    written = {"checksums.json", "config.json", "model.safetensors", "optimizer.safetensors",
               "state.json", "tokenizer.json", "tokenizer_config.json"}
    assert written <= names
    assert names - written <= {"vocab.txt", "special_tokens_map.json"}  # transformers 4.x too
    state = json.loads((checkpoints[-1] / "state.json").read_text())
    assert state["epoch"] == 2 and state["step"] == 0 and len(state["metrics"]) == 2
    optimizer_tensors = load_file(checkpoints[-1] / "optimizer.safetensors")
    assert "rng.torch" in optimizer_tensors and "0.exp_avg" in optimizer_tensors


def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(unbroken, tiny_model_dir,
                                                                  sentiment_dir, tmp_path):
    """Epoch 1 with checkpoints every 10 steps, the newest (the epoch's end) damaged on disk:
    --resume says so, continues from step 90 and ends as the unbroken 2-epoch run."""
    out = tmp_path / "run"
    fe.main(run_args(tiny_model_dir, sentiment_dir, out, "--batch-size", "4", "--save-every", "10",
                     "--epochs", "1", "--keep", "3"))
    checkpoints = fe.list_checkpoints(out)
    assert [c.name for c in checkpoints] == ["step-00000080", "step-00000090", "step-00000100-end"]
    data = bytearray((checkpoints[-1] / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the tensor data: only the checksum sees it
    (checkpoints[-1] / "model.safetensors").write_bytes(bytes(data))
    resumed = subprocess.run([sys.executable, SCRIPT, "--resume", str(out), "--epochs", "2"],
                             capture_output=True, text=True, timeout=HANG)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (f"warning: checkpoint {checkpoints[-1]} is damaged (model.safetensors: its checksum "
            "is not the one written with it); trying the one before it") in resumed.stdout
    assert f"resumed from {checkpoints[1]} (epoch 1, step 90)" in resumed.stdout
    assert_same_run(unbroken, out)
    assert not any(fe.damaged_files(c) for c in fe.list_checkpoints(out))  # rewritten whole


def test_predict_matches_the_in_process_model(unbroken, capsys):
    texts = ["a great and wonderful film", "boring awful plot", "the actors were superb"]
    fe.cli(["--predict", str(unbroken / "model"), *texts])
    printed = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    model, tokenizer = fe.load_model(str(unbroken / "model"), ["0", "1"])
    with torch.no_grad():
        logits = model.eval()(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    assert [row[0] for row in printed] == [str(i) for i in logits.argmax(-1).tolist()]
    assert [float(row[1]) for row in printed] == pytest.approx(
        logits.softmax(-1).max(-1).values.tolist(), abs=1e-3)
    assert [row[2] for row in printed] == texts


def test_predict_file_gives_one_line_per_input_line_in_order(unbroken, tmp_path, capsys):
    """Line N of the output is line N of the input: a blank line (or one of spaces) gets
    `-<tab>-<tab>`, and a form feed inside a review does not split it (issue 30)."""
    (tmp_path / "reviews.txt").write_text("loved it\n\nhated it\n   \nfine\x0cfilm\n")
    fe.cli(["--predict", str(unbroken / "model"), "--predict-file", str(tmp_path / "reviews.txt")])
    lines = [line.split("\t") for line in capsys.readouterr().out.split("\n")[:-1]]
    assert [text for _, _, text in lines] == ["loved it", "", "hated it", "", "fine\x0cfilm"]
    assert lines[1] == lines[3] == ["-", "-", ""]
    assert all(label in ("0", "1") and 0.5 <= float(prob) <= 1
               for i, (label, prob, _) in enumerate(lines) if i not in (1, 3))


def test_curves_png_is_written(unbroken):
    png = (unbroken / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_nan_loss_stops_after_saving_the_last_good_weights(monkeypatch, capsys, tiny_model_dir,
                                                           sentiment_dir, tmp_path):
    poisoned_forward(monkeypatch, bad_call=5)
    assert fe.cli(run_args(tiny_model_dir, sentiment_dir, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "error: the loss became nan at epoch 1, step 5; kept the last good weights in" in err
    [checkpoint] = fe.list_checkpoints(tmp_path)
    assert json.loads((checkpoint / "state.json").read_text())["global_step"] == 4
    weights = load_file(checkpoint / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nan_loss_skip_drops_that_step_only(monkeypatch, tiny_model_dir, sentiment_dir, tmp_path):
    poisoned_forward(monkeypatch, bad_call=5)
    metrics = fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path, "--on-nan", "skip"))
    assert [m["skipped_steps"] for m in metrics] == [1, 0]
    assert all(torch.isfinite(w).all() for w in final_weights(tmp_path).values())


def test_resume_without_a_checkpoint(capsys, tmp_path):
    assert "no checkpoint there" in cli_error(capsys, ["--resume", str(tmp_path)])


def test_resume_with_another_model(capsys, unbroken, tmp_path):
    err = cli_error(capsys, ["--resume", str(unbroken), "--model", str(tmp_path)])
    assert "was trained from --model" in err and "resume it without --model" in err


def test_output_dir_not_writable(capsys, tiny_model_dir, sentiment_dir, tmp_path):
    (tmp_path / "file").write_text("")
    err = cli_error(capsys, run_args(tiny_model_dir, sentiment_dir, tmp_path / "file" / "run"))
    assert "cannot write to the output directory" in err


def test_missing_local_paths(capsys, tiny_model_dir, sentiment_dir, tmp_path):
    assert "--dataset ./nowhere: no such file or directory" in cli_error(
        capsys, run_args(tiny_model_dir, "./nowhere", tmp_path))
    assert "--model ./nowhere: no such directory" in cli_error(
        capsys, run_args("./nowhere", sentiment_dir, tmp_path))


def test_null_texts(capsys, tiny_model_dir, tmp_path):
    frame = sentiment_frame(20, 0)
    frame.loc[3, "text"] = None
    frame.to_parquet(tmp_path / "train.parquet")
    sentiment_frame(10, 1).to_parquet(tmp_path / "test.parquet")
    err = cli_error(capsys, run_args(tiny_model_dir, tmp_path, tmp_path / "o"))
    assert "the train split has empty (null) values in 'text' or 'label'" in err


def test_single_class_is_an_error_and_three_classes_are_inferred(capsys, tiny_model_dir, tmp_path):
    for split in ("train", "test"):
        frame = sentiment_frame(24, 0)
        frame["label"] = 0
        frame.to_parquet(tmp_path / f"{split}.parquet")
    err = cli_error(capsys, run_args(tiny_model_dir, tmp_path, tmp_path / "o"))
    assert "the data has a single label (0): need at least 2 classes" in err
    for split in ("train", "test"):
        frame = sentiment_frame(24, 0)
        frame["label"] = [i % 3 for i in range(24)]
        frame.to_parquet(tmp_path / f"{split}.parquet")
    fe.main(run_args(tiny_model_dir, tmp_path, tmp_path / "three", "--epochs", "1"))
    from transformers import AutoConfig
    assert AutoConfig.from_pretrained(tmp_path / "three" / "model").num_labels == 3


def test_predict_errors(capsys, tmp_path):
    assert "not a saved model" in cli_error(capsys, ["--predict", str(tmp_path), "text"])
    assert "--predict-file nothing.txt: No such file" in cli_error(
        capsys, ["--predict", str(tmp_path), "--predict-file", "nothing.txt"])


def test_packed_run_killed_then_resumed_with_more_epochs_equals_the_unbroken_run(
        tiny_model_dir, tmp_path, monkeypatch):
    """Issue 30: the rows an epoch packs must not depend on --epochs, which a resume may
    change. 2,000 reviews in windows of 1,000 pack into 1,224 rows in epoch 0 and 1,232
    in epoch 1: a row count taken over --epochs gave the killed 1-epoch run 153 steps and
    the resumed 2-epoch run 154, so the resumed epoch 0 trained other rows than its
    checkpoint's step list assumed (some reviews twice, others never)."""
    data = tmp_path / "data"
    data.mkdir()
    sentiment_frame(2000, seed=0).to_parquet(data / "train.parquet")
    sentiment_frame(200, seed=1).to_parquet(data / "test.parquet")
    packed = ["--padding", "packed", "--max-per-row", "3", "--max-length", "48",
              "--eval-samples", "50", "--save-every", "20", "--log-every", "5"]
    fe.main(run_args(tiny_model_dir, data, tmp_path / "unbroken", *packed, "--epochs", "2"))
    out = tmp_path / "killed"
    proc = start(run_args(tiny_model_dir, data, out, *packed, "--epochs", "1"))
    wait_for_checkpoint(proc, out, timeout=HANG)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = json.loads((fe.list_checkpoints(out)[-1] / "state.json").read_text())
    assert newest["epoch"] == 0 and 0 < newest["step"] < 154 and not (out / "model").exists()

    # The resume, in this process, counting the rows each epoch's loader reads.
    fetched, rows_of, epoch_now = {}, {}, []
    pack_epoch, get_row = fe.Data.pack_epoch, fe.PackedRows.__getitem__

    def counting_pack_epoch(self, epoch):
        pack_epoch(self, epoch)
        epoch_now[:] = [epoch]
        rows_of[epoch] = self.train_set.rows

    def counting_get_row(self, i):
        if len(self.reviews) == 2000:  # the train rows, not the eval ones
            fetched.setdefault(epoch_now[0], []).append(i)
        return get_row(self, i)

    monkeypatch.setattr(fe.Data, "pack_epoch", counting_pack_epoch)
    monkeypatch.setattr(fe.PackedRows, "__getitem__", counting_get_row)
    fe.main(["--resume", str(out), "--epochs", "2"])
    assert_same_run(tmp_path / "unbroken", out)
    assert [len(rows) for rows in rows_of.values()] == [1232, 1232]
    done = newest["step"] * 8  # packed steps read their rows in order, 8 a step
    assert sorted(fetched[0]) == list(range(done, 1232))  # the rest of epoch 0, once each
    assert sorted(fetched[1]) == list(range(1232))
    for rows in rows_of.values():  # every review in exactly one row of each epoch
        assert sorted(review for row in rows for review in row) == list(range(2000))


def test_a_resume_with_another_lr_trains_with_it(unbroken, tmp_path):
    """Issue 30, a sibling: the optimizer's restored param_groups carried the old lr, so
    `--resume --lr` was announced as a change and silently not applied."""
    out = tmp_path / "run"
    shutil.copytree(unbroken, out)
    fe.main(["--resume", str(out), "--epochs", "3", "--lr", "5e-4"])
    state = json.loads((fe.list_checkpoints(out)[-1] / "state.json").read_text())
    assert state["epoch"] == 3
    assert {group["lr"] for group in state["optimizer"]["param_groups"]} == {5e-4}  # each group


# A checkpoint write slowed to a second, so that a second Ctrl-C can land inside it; the flag
# file says when the first save has begun.
SLOW_SAVE = """
import pathlib, sys, time
sys.path.insert(0, {root!r})
import finetune_electra as fe
write = fe.write_model_files

def slow_write(folder, *args):
    pathlib.Path({flag!r}).write_text(folder.name)
    time.sleep(1.0)
    write(folder, *args)

fe.write_model_files = slow_write
sys.exit(fe.cli(sys.argv[1:]))
"""


def test_a_second_ctrl_c_inside_a_save_waits_for_the_checkpoint(unbroken, tiny_model_dir,
                                                                sentiment_dir, tmp_path):
    """Issue 32: before, the second SIGINT raised KeyboardInterrupt inside the save, left
    only checkpoints/.step-N.tmp, and --resume said 'no checkpoint there'."""
    out, flag = tmp_path / "run", tmp_path / "saving"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE.format(root=str(ROOT), flag=str(flag)),
         *run_args(tiny_model_dir, sentiment_dir, out, "--batch-size", "4", "--save-every", "10")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + HANG
    while not flag.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)  # inside the first save: both land there
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=HANG)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert "stopped by SIGINT (a second one: at once, without saving) at epoch 1, step 10" in stdout
    [checkpoint] = fe.list_checkpoints(out)
    assert checkpoint.name == "step-00000010" and not fe.damaged_files(checkpoint)
    assert not list((out / "checkpoints").glob(".*.tmp"))
    resumed = subprocess.run([sys.executable, SCRIPT, "--resume", str(out)],
                             capture_output=True, text=True, timeout=HANG)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(unbroken, out)


SIGNAL_IN_THE_STOP = """
import os, signal, sys
sys.path.insert(0, {root!r})
import finetune_electra as fe
handle, write = fe.StopRequest.handle, fe.write_results
stopping = []

def noted(self, signum, frame):
    stopping.append(signum)
    handle(self, signum, frame)

def interrupted_write(*args, **kwargs):  # the stop writes its metrics: a Ctrl-C lands there
    if stopping:
        os.kill(os.getpid(), signal.SIGINT)
    write(*args, **kwargs)

fe.StopRequest.handle, fe.write_results = noted, interrupted_write
sys.exit(fe.run_as_script())
"""


def test_a_ctrl_c_while_the_stop_writes_its_metrics_is_ignored(tiny_model_dir, sentiment_dir,
                                                               tmp_path):
    """A CI run: the second Ctrl-C landed in the stop's metrics (importing matplotlib) and
    ended it in a StopNow traceback, exit 1. Now the stop under way finishes: exit 130."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGNAL_IN_THE_STOP.format(root=str(ROOT)),
         *run_args(tiny_model_dir, sentiment_dir, out, "--batch-size", "4", "--save-every", "10")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=HANG)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    stopped = re.search(r"stopped by SIGINT at epoch 1, step (\d+);", stdout)
    assert stopped, stdout[-2000:]
    loss_curve = json.loads((out / "loss_curve.json").read_text())  # the stop's, to its step
    assert loss_curve[-1][0] == int(stopped[1]) and (out / "curves.png").is_file()


def test_two_quick_ctrl_c_in_training_stop_cleanly_and_keep_a_checkpoint(
        unbroken, tiny_model_dir, sentiment_dir, tmp_path):
    """20 ms apart: the second lands in a step (stop at once) or in the stop's own save
    (written first); either way no traceback, and the run resumes to the unbroken one."""
    out = tmp_path / "run"
    proc = start(run_args(tiny_model_dir, sentiment_dir, out, "--batch-size", "4", "--save-every", "10"))
    wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=HANG)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert "stopped by SIGINT" in stdout and f"resume with: python {SCRIPT} --resume {out}" in stdout
    assert all(not fe.damaged_files(c) for c in fe.list_checkpoints(out))
    resumed = subprocess.run([sys.executable, SCRIPT, "--resume", str(out)],
                             capture_output=True, text=True, timeout=HANG)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(unbroken, out)

"""Nothing lost, part 3: an output directory holds one run, one process at a time, and a
resume says what it changes (refusing what would change what the checkpoints mean)."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import finetune_electra as fe
from conftest import HANG, ROOT, cli_error, epochs_done, run_args

SCRIPT = str(ROOT / "finetune_electra.py")
RESULTS = ("args.json", "metrics.jsonl", "model/model.safetensors")


def snapshot(out):
    return {name: (out / name).read_bytes() for name in RESULTS}


@pytest.fixture(scope="module")
def finished(tiny_model_dir, sentiment_dir, tmp_path_factory):
    """A finished 1-epoch run with checkpoints; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("finished") / "run"
    fe.main(run_args(tiny_model_dir, sentiment_dir, out, "--epochs", "1", "--save-every", "20"))
    return out


@pytest.fixture
def run_dir(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_a_new_run_in_a_run_directory_is_refused_and_the_run_kept(
        run_dir, tiny_model_dir, sentiment_dir, capsys):
    before = snapshot(run_dir)
    accuracy = json.loads((run_dir / "metrics.jsonl").read_text())["accuracy"]
    error = cli_error(capsys, run_args(tiny_model_dir, sentiment_dir, run_dir, "--epochs", "1"))
    assert error == (f"error: --output-dir {run_dir} holds a finished run: 1 epoch, accuracy "
                     f"{accuracy:.3f}: continue it with --resume {run_dir}, or pass a new "
                     "--output-dir (--overwrite replaces it)")
    assert snapshot(run_dir) == before


def test_an_unfinished_run_is_described_by_its_epochs_and_newest_checkpoint(run_dir):
    (run_dir / "metrics.jsonl").write_text("")
    assert fe.describe_run(run_dir) == ("an unfinished run: 0 of 1 epochs done, newest "
                                        "checkpoint step-00000050-end")
    assert fe.describe_run(run_dir / "checkpoints") is None  # no args.json: not a run
    for path in fe.list_checkpoints(run_dir) + [run_dir / "model"]:
        shutil.rmtree(path)
    assert fe.describe_run(run_dir) is None  # a start that failed early: nothing to keep


def start(argv):
    return subprocess.Popen([sys.executable, SCRIPT, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc, timeout=HANG):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_a_second_process_in_the_same_directory_is_refused_naming_the_first(
        tiny_model_dir, sentiment_dir, tmp_path):
    """A second run, and a second --resume, while the first runs: one line naming it."""
    out = tmp_path / "run"
    first = start(run_args(tiny_model_dir, sentiment_dir, out, "--epochs", "40",
                           "--save-every", "10"))
    wait_for(lambda: fe.list_checkpoints(out), first)
    holder = f"pid {first.pid} on {socket.gethostname()} (since "
    for argv in (run_args(tiny_model_dir, sentiment_dir, out), ["--resume", str(out)]):
        second = subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True,
                                timeout=HANG)
        errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert len(errors) == 1 and errors[0].startswith(f"error: {out} is in use by {holder}")
        assert errors[0].endswith("wait for that run to end, or use another --output-dir")
    assert first.poll() is None  # the first run goes on, untouched
    first.send_signal(signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=HANG)
    assert first.returncode == 143, stderr[-2000:]  # 128 + SIGTERM, as a shell reports it
    assert (out / ".lock").read_text() == ""  # a clean end leaves no stale lock


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(tiny_model_dir, sentiment_dir,
                                                              tmp_path):
    out = tmp_path / "run"
    killed = start(run_args(tiny_model_dir, sentiment_dir, out, "--epochs", "40",
                            "--save-every", "10"))
    wait_for(lambda: fe.list_checkpoints(out), killed)
    killed.kill()
    killed.wait()
    assert (out / ".lock").read_text().startswith(f"pid {killed.pid} on ")
    resumed = subprocess.run([sys.executable, SCRIPT, "--resume", str(out), "--epochs", "1"],
                             capture_output=True, text=True, timeout=HANG)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (f"note: {out} had a stale lock (pid {killed.pid} on {socket.gethostname()}"
            in resumed.stdout and "no longer running): taking it over" in resumed.stdout)


def test_resume_refuses_what_would_change_the_saved_state(run_dir, capsys):
    before = snapshot(run_dir)
    error = cli_error(capsys, ["--resume", str(run_dir), "--batch-size", "16", "--seed", "1",
                               "--epochs", "2"])
    assert error == (f"error: --resume {run_dir}: --batch-size 8 → 16, --seed 42 → 1 would change "
                     "what its checkpoints mean; resume with the run's own settings, or start a "
                     "new run in a new --output-dir")
    assert snapshot(run_dir) == before and not (run_dir / "resumes.jsonl").exists()


def test_resume_allows_epochs_and_lr_says_so_and_keeps_the_record(run_dir, capsys):
    args_before = (run_dir / "args.json").read_bytes()
    metrics = fe.main(["--resume", str(run_dir), "--epochs", "2", "--lr", "5e-4"])
    out = capsys.readouterr().out
    assert "resuming with changed settings: epochs 1 → 2, lr 0.001 → 0.0005" in out
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert (run_dir / "args.json").read_bytes() == args_before  # how the run started
    [resume] = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert resume["changed"] == {"epochs": [1, 2], "lr": [0.001, 0.0005]} and resume["when"]


def killed_before_its_first_checkpoint(argv, out):
    """A real run, kill -9'd once it has claimed `out` and before its first checkpoint."""
    proc = start(argv)
    wait_for(lambda: not (out / "metrics.jsonl").exists() and (out / "args.json").exists()
             and json.loads((out / "args.json").read_text())["epochs"] == 40, proc)
    proc.kill()
    proc.wait()
    assert not fe.list_checkpoints(out)


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(
        run_dir, tiny_model_dir, sentiment_dir, capsys):
    before = snapshot(run_dir)
    # a start that fails before the run claims the directory touches nothing
    cli_error(capsys, run_args(tiny_model_dir, sentiment_dir, run_dir, "--overwrite",
                               "--max-length", "4096"))
    assert snapshot(run_dir) == before and not (run_dir / fe.OVERWRITTEN).exists()
    # a replacement killed before its first checkpoint: the old run is still there
    killed_before_its_first_checkpoint(
        run_args(tiny_model_dir, sentiment_dir, run_dir, "--overwrite", "--epochs", "40"), run_dir)
    assert snapshot(run_dir / fe.OVERWRITTEN) == before
    error = cli_error(capsys, run_args(tiny_model_dir, sentiment_dir, run_dir))
    assert (f"holds in .overwritten a run that --overwrite set aside (a finished run: 1 epoch, "
            f"accuracy {json.loads(before['metrics.jsonl'])['accuracy']:.3f}), whose "
            "replacement stopped before its first checkpoint (--resume puts that run back)") in error
    # a replacement that gets to its first checkpoint: the old run goes
    metrics = fe.main(run_args(tiny_model_dir, sentiment_dir, run_dir, "--overwrite",
                               "--epochs", "1", "--lr", "5e-4"))
    assert not (run_dir / fe.OVERWRITTEN).exists() and len(metrics) == 1
    assert json.loads((run_dir / "args.json").read_text())["lr"] == 5e-4


def test_resume_puts_back_the_run_a_killed_overwrite_set_aside(
        run_dir, tiny_model_dir, sentiment_dir, capsys):
    """Issue 31: the message advised --resume DIR, which said 'no checkpoint there'."""
    before = snapshot(run_dir)
    killed_before_its_first_checkpoint(
        run_args(tiny_model_dir, sentiment_dir, run_dir, "--overwrite", "--epochs", "40"), run_dir)
    error = cli_error(capsys, run_args(tiny_model_dir, sentiment_dir, run_dir))
    assert f"continue it with --resume {run_dir}" in error  # the advice this test follows
    assert fe.cli(["--resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"put back the run that --overwrite had set aside in {run_dir / fe.OVERWRITTEN}" in out
    assert f"{run_dir} holds a finished run (1 of 1 epochs, accuracy" in out  # nothing to resume
    assert snapshot(run_dir) == before and not (run_dir / fe.OVERWRITTEN).exists()
    assert fe.cli(["--predict", str(run_dir / "model"), "a wonderful film"]) == 0


def test_overwrite_and_resume_together_are_one_error_line(run_dir, capsys):
    error = cli_error(capsys, ["--resume", str(run_dir), "--overwrite"])
    assert error == "error: --overwrite starts a new run and --resume continues one: give one of them"


def test_default_run_directories_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = fe.new_run_dir(), fe.new_run_dir()
    assert first != second and first.is_dir() and second.is_dir()
    if first.name[:15] == second.name[:15]:  # the same second
        assert second.name == f"{first.name}-2"


def test_resume_auto_takes_the_newest_unfinished_run(finished, tmp_path, monkeypatch, capsys):
    """Issue 32: it took the newest run with a checkpoint, a finished one, and trained nothing."""
    import os
    monkeypatch.chdir(tmp_path)
    older, newer = tmp_path / "runs" / "older", tmp_path / "runs" / "newer"
    shutil.copytree(finished, older)
    shutil.copytree(finished, newer)
    shutil.rmtree(older / "model")  # older: killed in its epoch, at its mid-epoch checkpoint
    (older / "metrics.jsonl").write_text("")
    shutil.rmtree(fe.list_checkpoints(older)[-1])
    for age, run in ((200, older), (100, newer)):
        for checkpoint in fe.list_checkpoints(run):
            os.utime(checkpoint, (time.time() - age, time.time() - age))
    assert fe.cli(["--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "resumed from runs/older/checkpoints/step-00000040 (epoch 1, step 40)" in out
    assert len(epochs_done(older)) == 1 and (older / "model").is_dir()
    assert fe.cli(["--resume", "auto"]) == 0  # every run finished now: one line, naming the newest
    newest = max((older, newer), key=lambda d: fe.list_checkpoints(d)[-1].stat().st_mtime)
    assert capsys.readouterr().out.startswith(
        f"--resume auto: every run under runs/ is finished; the newest is runs/{newest.name} "
        "(a finished run: 1 epoch, accuracy ")

"""torchrun on CPUs (gloo): data parallel and pipeline stages give the single-process run."""

import contextlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import finetune_electra as fe
from conftest import (HANG, ROOT, assert_accuracy_of_saved_model, cli_error, minilm_dir,
                      summary_of, tiny_electra)

# Micro-batches of 2 and 8 samples per optimizer step in every layout, the same
# batches in the same order, static padding, no dropout: the runs must agree.
COMMON = ["--max-length", "32", "--padding", "max_length", "--group-by-length", "no",
          "--train-samples", "96", "--eval-samples", "50", "--epochs", "2", "--lr", "1e-3",
          "--batch-size", "2", "--device-iterations", "4", "--log-every", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def deterministic_model_dir(tmp_path_factory, tiny_model_dir):
    from transformers import AutoTokenizer
    out = tmp_path_factory.mktemp("no-dropout")
    torch.manual_seed(0)
    tiny_electra(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


NEEDS_PIPELINING = pytest.mark.skipif(
    fe.TORCH_VERSION < (2, 4),
    reason=f"torch.distributed.pipelining needs torch 2.4+, this is torch {torch.__version__}")
LAYOUTS = {  # name: (processes, arguments)
    "ddp": (2, ["--stages", "1", "--gradient-accumulation", "2"]),
    "gpipe": (2, ["--stages", "2", "--gradient-accumulation", "4", "--schedule", "gpipe"]),
    "1f1b_x2": (4, ["--stages", "2", "--gradient-accumulation", "2", "--schedule", "1f1b"]),
}
PIPELINE_LAYOUTS = ("gpipe", "1f1b_x2")
EACH_LAYOUT = pytest.mark.parametrize("layout", [
    pytest.param(name, marks=NEEDS_PIPELINING if name in PIPELINE_LAYOUTS else ())
    for name in LAYOUTS])


def torchrun_command(nproc, *argv):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", str(ROOT / "finetune_electra.py"), *argv]


def torchrun(nproc, *argv):
    return subprocess.run(torchrun_command(nproc, *argv), capture_output=True, text=True,
                          timeout=HANG)


# Packed rows: up to 3 reviews of 7-47 tokens in each row of 64 (section 11 of the script).
# max_length: with the Trainer's controls on (issue 29): a cosine schedule with warm-up,
# weight decay (none on biases and LayerNorm weights) and clipping (pipelines: the norm
# over all stages). Packed: the tutorial's constant lr (its few steps move the weights less).
PADDINGS = {"max_length": ["--lr-scheduler-type", "cosine", "--warmup-steps", "4",
                           "--weight-decay", "0.05", "--max-grad-norm", "0.5"],
            "packed": ["--padding", "packed", "--max-length", "64", "--max-per-row", "3"]}


@pytest.fixture(scope="module", params=list(PADDINGS))
def runs(request, deterministic_model_dir, sentiment_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    data = ["--model", str(deterministic_model_dir), "--dataset", str(sentiment_dir), *COMMON,
            *PADDINGS[request.param]]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        fe.main([*data, "--gradient-accumulation", "4", "--output-dir", str(root / "single")])
    (root / "single" / "stdout.txt").write_text(printed.getvalue())
    for name, (nproc, layout) in LAYOUTS.items():
        if name in PIPELINE_LAYOUTS and fe.TORCH_VERSION < (2, 4):
            continue
        proc = torchrun(nproc, *data, *layout, "--output-dir", str(root / name))
        assert proc.returncode == 0, proc.stderr[-3000:]
        (root / name / "stdout.txt").write_text(proc.stdout)
    return root


def read(run, name):
    return json.loads((run / name).read_text()) if name.endswith(".json") else [
        json.loads(line) for line in (run / name).read_text().splitlines()]


@EACH_LAYOUT
def test_loss_curve_and_weights_match_the_single_process_run(runs, layout, deterministic_model_dir):
    single, multi = read(runs / "single", "loss_curve.json"), read(runs / layout, "loss_curve.json")
    steps = 24 if runs.name.startswith("max_length") else len(single)
    assert [step for step, *_ in multi] == [step for step, *_ in single] == list(range(1, steps + 1))
    # tolerance: float sums in another order (gradient all-reduce, micro-batch split)
    assert [loss for _, loss, *_ in multi] == pytest.approx([loss for _, loss, *_ in single], rel=1e-4)
    assert [lr for *_, lr in multi] == [lr for *_, lr in single]  # the schedule, step by step
    a, b = load_file(runs / "single" / "model" / "model.safetensors"), \
        load_file(runs / layout / "model" / "model.safetensors")
    initial = load_file(deterministic_model_dir / "model.safetensors")
    assert max((a[k] - initial[k]).abs().max() for k in a) > 1e-2  # training moved the weights
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-5)


@EACH_LAYOUT
def test_multi_rank_accuracy_counts_every_eval_sample_once(runs, layout):
    metrics = read(runs / layout, "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert_accuracy_of_saved_model(metrics, runs / layout)
    assert metrics[-1]["accuracy"] == read(runs / "single", "metrics.jsonl")[-1]["accuracy"]


def test_the_summary_counts_steps_and_samples_over_the_ranks(runs):
    """2 DDP ranks x micro-batch 2 x accumulation 2 = 8 samples a step; 96 // 8 = 12 steps."""
    if runs.name.startswith("packed"):
        packed = summary_of((runs / "ddp" / "stdout.txt").read_text())
        assert packed["micro-batch"] == "2 rows" and packed["padding"].startswith("packed")
        single = summary_of((runs / "single" / "stdout.txt").read_text())
        for row in ("samples per optimizer step", "optimizer steps per epoch", "padding",
                    "packing efficiency"):
            assert packed[row] == single[row]
        return
    summary = summary_of((runs / "ddp" / "stdout.txt").read_text())
    assert summary["device"] == "cpu, torchrun: 2 ranks = 2 replica(s) x 1 stage(s)"
    assert summary["samples per optimizer step"] == "8"
    assert summary["optimizer steps per epoch"] == "12"
    assert summary["optimizer steps in total"] == "24"
    assert summary["gradient accumulation"] == "2 micro-batches per optimizer step"
    assert summary["train examples"] == "96" and summary["eval examples"] == "50"
    single = (runs / "single" / "stdout.txt").read_text()
    assert summary_of(single)["samples per optimizer step"] == "8"
    assert summary_of(single)["device"] == "cpu"
    assert "pipeline stage plan" not in single  # no stages on one CPU process: no table


@NEEDS_PIPELINING
def test_only_rank_0_reports(runs):
    out = (runs / "1f1b_x2" / "stdout.txt").read_text()
    assert out.count("Accuracy: ") == 2
    assert out.count("pipeline stage plan (2 stages, one stage per rank, 2 replica(s))") == 1
    unit = "rows" if runs.name.startswith("packed") else "samples"
    assert f"torchrun: 4 ranks = 2 replica(s) x 2 stage(s); 8 {unit} per optimizer step" in out


def test_impossible_layout_is_a_clear_error_before_work(deterministic_model_dir, sentiment_dir,
                                                         tmp_path):
    proc = torchrun(2, "--model", str(deterministic_model_dir), "--dataset", str(sentiment_dir),
                    "--stages", "4", "--output-dir", str(tmp_path), "--device", "cpu")
    assert proc.returncode != 0
    assert "error: 2 processes cannot hold whole 4-stage pipelines: use --stages 1" in proc.stderr
    assert "Traceback" not in proc.stderr.split("error:")[0]


def test_pipelines_without_torch_pipelining_are_a_clear_error_before_work(
        monkeypatch, capsys, tmp_path):
    """The IPU host's torch 2.0.1 has no torch.distributed.pipelining: say so before any work."""
    monkeypatch.setattr(fe, "TORCH_VERSION", (2, 0))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = cli_error(capsys, ["--device", "cpu", "--stages", "2", "--output-dir", str(tmp_path)])
    assert "torchrun with --stages 2 needs torch.distributed.pipelining, in torch 2.4 or newer" in err
    assert f"this is torch {torch.__version__}" in err and "use --stages 1" in err
    assert not any(tmp_path.iterdir())  # nothing written: no work was done


# --- issue 30/31: killed with kill -9 and resumed, every layout equals its unbroken run ---
# Dropout on (the tiny model's 0.1): each rank draws its own masks, so each rank's random
# state must come back. 400 reviews, 8 a step: 50 steps an epoch, a checkpoint every 5
# (a kill or stop after the first lands well inside epoch 1).
# Killed at the first checkpoint (step 5): mid-warm-up (issue 29), clipping on.
RESUMABLE = ["--max-length", "32", "--padding", "max_length", "--group-by-length", "no",
             "--eval-samples", "50", "--epochs", "2", "--lr", "1e-3",
             "--batch-size", "2", "--device-iterations", "4", "--log-every", "1",
             "--device", "cpu", "--save-every", "5", "--lr-scheduler-type", "linear",
             "--warmup-steps", "20", "--max-grad-norm", "0.5"]


def kill_after_first_checkpoint(command, out, timeout=HANG):
    """Start a run in its own process group; at its first checkpoint, kill -9 the group."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + timeout
    while not fe.list_checkpoints(out):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (out / "model").exists()  # it died mid-run
    newest = json.loads((fe.list_checkpoints(out)[-1] / "state.json").read_text())
    assert newest["epoch"] == 0 and newest["step"] > 0  # mid-epoch
    return newest


def resumable_args(layout, model_dir, data_dir):
    return ["--model", str(model_dir), "--dataset", str(data_dir), *RESUMABLE, *LAYOUTS[layout][1]]


@pytest.fixture(scope="module")
def killed_ddp(tiny_model_dir, sentiment_dir, tmp_path_factory):
    """A DDP run killed mid-epoch; each test continues a copy of it."""
    out = tmp_path_factory.mktemp("killed") / "ddp"
    kill_after_first_checkpoint(
        torchrun_command(2, *resumable_args("ddp", tiny_model_dir, sentiment_dir),
                         "--output-dir", str(out)), out)
    return out


@pytest.fixture(scope="module")
def unbroken_ddp(tiny_model_dir, sentiment_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("unbroken") / "ddp"
    proc = torchrun(2, *resumable_args("ddp", tiny_model_dir, sentiment_dir), "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def assert_same_curve_and_weights(out, unbroken):
    curve, expected = read(out, "loss_curve.json"), read(unbroken, "loss_curve.json")
    assert [step for step, *_ in curve] == [step for step, *_ in expected] == list(range(1, 101))
    assert [loss for _, loss, *_ in curve] == pytest.approx([loss for _, loss, *_ in expected], rel=1e-6)
    assert [lr for *_, lr in curve] == [lr for *_, lr in expected]
    a = load_file(out / "model" / "model.safetensors")
    b = load_file(unbroken / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", [
    "ddp", pytest.param("gpipe", marks=NEEDS_PIPELINING)])
def test_killed_torchrun_run_resumes_to_the_unbroken_run(layout, killed_ddp, unbroken_ddp,
                                                         tiny_model_dir, sentiment_dir, tmp_path):
    nproc, data = LAYOUTS[layout][0], resumable_args(layout, tiny_model_dir, sentiment_dir)
    out, unbroken = tmp_path / "killed", unbroken_ddp
    if layout == "ddp":
        shutil.copytree(killed_ddp, out)
    else:
        unbroken = tmp_path / "unbroken"
        proc = torchrun(nproc, *data, "--output-dir", str(unbroken))
        assert proc.returncode == 0, proc.stderr[-3000:]
        kill_after_first_checkpoint(torchrun_command(nproc, *data, "--output-dir", str(out)), out)
    resumed = torchrun(nproc, "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same_curve_and_weights(out, unbroken)


def test_a_stopped_torchrun_run_prints_the_torchrun_command_that_resumes_it(
        unbroken_ddp, tiny_model_dir, sentiment_dir, tmp_path):
    """Issue 32: it printed `python finetune_electra.py --resume DIR`, which one process ran
    with each saved 16-sample step cut to its first 8 samples."""
    out = tmp_path / "ddp"
    proc = subprocess.Popen(torchrun_command(2, *resumable_args("ddp", tiny_model_dir, sentiment_dir),
                                             "--output-dir", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + HANG
    while not fe.list_checkpoints(out):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to its workers
    stdout, stderr = proc.communicate(timeout=HANG)
    assert "stopped by SIGTERM at epoch 1, step " in stdout, stderr[-3000:]
    command = stdout.split("resume with: ")[1].splitlines()[0]
    script = ROOT / "finetune_electra.py"
    assert command == f"torchrun --nproc-per-node 2 {script} --resume {out}"
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run",  # = torchrun
                              *shlex.split(command)[1:]], capture_output=True, text=True,
                             timeout=HANG)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_curve_and_weights(out, unbroken_ddp)


def test_a_resume_with_another_process_count_is_refused_with_the_command_that_works(
        killed_ddp, tmp_path):
    """A torchrun run resumed by one process would cut each saved step to that process's
    share (issue 32): refused, naming the torchrun command."""
    out = tmp_path / "ddp"
    shutil.copytree(killed_ddp, out)
    alone = subprocess.run([sys.executable, str(ROOT / "finetune_electra.py"), "--resume", str(out)],
                           capture_output=True, text=True, timeout=HANG)
    assert alone.returncode == 2, alone.stderr[-3000:]
    assert "was written by 2 process(es), this run has 1: resume it as it ran, with torchrun " \
           f"--nproc-per-node 2 {ROOT / 'finetune_electra.py'} --resume {out}" in alone.stderr


def test_a_ddp_run_that_max_steps_ended_continues_to_the_unbroken_run(
        unbroken_ddp, tiny_model_dir, sentiment_dir, tmp_path):
    """Issue 36: --max-steps 20 ends epoch 1 early (and the warm-up with it, so its lrs are
    the unbroken run's); --resume with no budget (-1: --epochs decides) trains on from step
    20 into exactly the unbroken 2-epoch run."""
    out = tmp_path / "ddp"
    first = torchrun(2, *resumable_args("ddp", tiny_model_dir, sentiment_dir), "--max-steps", "20",
                     "--output-dir", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "the run ends after 20 of its 50 steps" in first.stdout
    resumed = torchrun(2, "--resume", str(out), "--max-steps", "-1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "(epoch 1, step 20)" in resumed.stdout
    assert_same_curve_and_weights(out, unbroken_ddp)


NO_DROPOUT = {"roberta": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
              "distilbert": dict(dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0),
              "modernbert": dict(embedding_dropout=0.0, attention_dropout=0.0, mlp_dropout=0.0,
                                 classifier_dropout=0.0),
              "deberta-v2": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                 relative_attention=True, pos_att_type=["p2c", "c2p"],
                                 position_biased_input=False),  # as DeBERTa-v3's
              "llama": dict(attention_dropout=0.0),
              "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}


@NEEDS_PIPELINING
@pytest.mark.parametrize("family", [*NO_DROPOUT, "deberta-v2 packed"])
def test_other_families_in_a_pipeline_equal_one_process(family, sentiment_dir, tmp_path):
    """Issue 38: RoBERTa (encoder.layer, position ids after the padding index), DeBERTa-v2
    (relative attention, as DeBERTa-v3's, with its shared relative embeddings), DistilBERT
    (transformer.layer), ModernBERT (layers, rotary positions) and the decoders Llama and
    GPT-2 (layers, h; the head's last token found from the mask on the first stage) split
    over 2 stages train as one process does, step by step. Packed DeBERTa: its blocks take
    the packed mask, its embeddings a 2D one."""
    import transformers
    from test_families import tiny_classifier
    family, *packed = family.split()
    model = tiny_classifier(family, **NO_DROPOUT[family])  # skips where transformers lacks it
    if packed and type(model).__name__ not in fe.PACKABLE_MODELS:
        pytest.skip(f"transformers {transformers.__version__}: no packing for {family}")
    model_dir = tmp_path / family
    model.save_pretrained(model_dir)
    transformers.AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(model_dir)
    single = assert_a_pipeline_equals_one_process(
        model_dir, sentiment_dir, tmp_path,
        *(["--padding", "packed", "--max-length", "64", "--max-per-row", "3"] if packed else []))
    assert len(single) == (6 if packed else 12)  # 96 reviews: 12 steps of 8 (packed rows: 6)


@NEEDS_PIPELINING
@pytest.mark.parametrize("padding", ["max_length", "packed"])
def test_sentence_pairs_in_a_pipeline_equal_one_process(padding, deterministic_model_dir,
                                                         tmp_path):
    """Issue 38: a pair's token type ids reach the embeddings on the first stage (packed rows:
    in each review's slot), and the 2-stage pipeline trains as one process does."""
    from test_pairs import pairs_frame
    (tmp_path / "pairs").mkdir()
    for split, (n, seed) in {"train": (96, 0), "test": (50, 1)}.items():
        pairs_frame(n, seed).to_parquet(tmp_path / "pairs" / f"{split}.parquet")
    packed = ["--padding", "packed", "--max-length", "64", "--max-per-row", "3"] \
        if padding == "packed" else []
    assert_a_pipeline_equals_one_process(deterministic_model_dir, tmp_path / "pairs", tmp_path,
                                         "--text-column", "first,second", *packed)


def assert_a_pipeline_equals_one_process(model_dir, data_dir, tmp_path, *extra):
    """One epoch on one process and on a 2-stage gpipe pipeline: the same loss at every
    step, the same weights."""
    data = ["--model", str(model_dir), "--dataset", str(data_dir), *COMMON, "--epochs", "1",
            "--gradient-accumulation", "4", *extra]
    with contextlib.redirect_stdout(io.StringIO()):
        fe.main([*data, "--output-dir", str(tmp_path / "single")])
    proc = torchrun(2, *data, "--stages", "2", "--schedule", "gpipe",
                    "--output-dir", str(tmp_path / "pipeline"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pipeline stage plan (2 stages" in proc.stdout
    single, pipe = (read(tmp_path / run, "loss_curve.json") for run in ("single", "pipeline"))
    assert [step for step, *_ in pipe] == [step for step, *_ in single] == list(
        range(1, len(single) + 1))  # --log-every 1: every step's loss
    assert [loss for _, loss, *_ in pipe] == pytest.approx([loss for _, loss, *_ in single],
                                                          rel=1e-4)
    a, b = (load_file(tmp_path / run / "model" / "model.safetensors")
            for run in ("single", "pipeline"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-5)
    return single

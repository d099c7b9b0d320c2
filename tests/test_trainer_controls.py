"""The controls a fine-tuner reaches for (issue 29), named as HF's TrainingArguments names
them: the lr schedule and warm-up, weight decay, clipping, evaluation during training, the
best model, early stopping, --max-steps, fp16 and the auto precision, TensorBoard. On CPU
and on the PopTorch stand-in (tests/poptorch_standin.py, not PopTorch); torchrun's DDP and
pipelines are in test_torchrun.py, CUDA graphs in test_cuda_graphs.py."""

import json

import pytest
import torch

import finetune_electra as fe
from conftest import HANG, IPU_ARGS, ROOT, WithIdentityLoss, cli_error, run_args, summary_of, tiny_electra

TRAINER_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 7])
def test_the_schedule_is_the_trainers(kind, warmup):
    """Each step's lr equals what transformers' own scheduler gives the Trainer."""
    from transformers import get_scheduler
    total, lr = 40, 1e-3
    args = fe.parse_args(["--lr", str(lr), "--lr-scheduler-type", kind,
                          "--warmup-steps", str(warmup)])
    schedule = fe.Schedule(args, total)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    trainers = get_scheduler(TRAINER_SCHEDULES[kind], optimizer, num_warmup_steps=warmup,
                             num_training_steps=total)
    expected = []
    for _ in range(total):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        trainers.step()
    assert [schedule.lr_at(step) for step in range(total)] == pytest.approx(expected, abs=1e-15)
    assert fe.Schedule(fe.parse_args(["--warmup-ratio", "0.1"]), 95).warmup == 10  # ceil, as HF


def test_biases_and_layernorm_weights_are_not_decayed():
    model = tiny_electra()
    groups = fe.decay_groups(model, 0.1)
    assert [group["weight_decay"] for group in groups] == [0.1, 0.0]
    no_decay = {name for name, p in model.named_parameters()
                if any(p is q for q in groups[1]["params"])}
    assert no_decay == {name for name, _ in model.named_parameters()
                        if name.endswith("bias") or "LayerNorm" in name}
    optimizer = fe.adamw(groups, 0.01, torch.device("cpu"), 0.1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's own update is then 0: only the decay moves weights
    optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] if name in no_decay else before[name] * (1 - 0.01 * 0.1)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0, msg=name)


def test_clipping_is_clip_grad_norm_on_a_reference_step():
    torch.manual_seed(0)
    model, reference = tiny_electra(), tiny_electra()
    reference.load_state_dict(model.state_dict())
    batch = {"input_ids": torch.randint(1000, 2000, (4, 16)), "labels": torch.tensor([0, 1, 0, 1])}
    args = fe.parse_args(["--max-grad-norm", "0.05", "--weight-decay", "0"])
    cpu = torch.device("cpu")
    optimizer = fe.adamw(model.parameters(), 1e-3, cpu, 0.0)
    train_step, _ = fe.torch_steps(model, model, optimizer, args, cpu, 1, None, fe.Ranks())
    torch.manual_seed(1)  # the same dropout masks in both forwards
    loss = train_step(batch)
    torch.manual_seed(1)
    reference.train()
    reference_loss = reference(**batch).loss
    reference_loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
    assert norm > 0.05  # the step was clipped
    torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0).step()
    assert float(loss) == pytest.approx(float(reference_loss.detach()), rel=1e-6)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def controlled_run(tiny_model_dir, sentiment_dir, tmp_path_factory):
    """One CPU run with every control on: each step's lr as the optimizer saw it."""
    out = tmp_path_factory.mktemp("controls") / "run"
    seen = []
    with pytest.MonkeyPatch.context() as patch:
        step = torch.optim.AdamW.step

        def recording_step(self, *args, **kwargs):
            seen.append([group["lr"] for group in self.param_groups])
            return step(self, *args, **kwargs)
        patch.setattr(torch.optim.AdamW, "step", recording_step)
        metrics = fe.main(run_args(tiny_model_dir, sentiment_dir, out, "--log-every", "1",
                                   "--lr-scheduler-type", "cosine", "--warmup-steps", "15",
                                   "--max-grad-norm", "1.0", "--eval-steps", "20",
                                   "--load-best-model-at-end", "--report-to", "tensorboard"))
    return metrics, out, seen


def test_each_step_runs_with_its_scheduled_lr(controlled_run):
    metrics, out, seen = controlled_run
    schedule = fe.Schedule(fe.parse_args(["--lr", "1e-3", "--lr-scheduler-type", "cosine",
                                          "--warmup-steps", "15"]), 100)
    assert len(seen) == 100 and all(len(set(lrs)) == 1 for lrs in seen)  # both groups alike
    assert [lrs[0] for lrs in seen] == pytest.approx([schedule.lr_at(s) for s in range(100)])
    assert seen[0][0] == 0 and seen[15][0] == pytest.approx(1e-3)  # warm-up from 0 to the peak
    curve = json.loads((out / "loss_curve.json").read_text())
    assert [lr for _, _, lr in curve] == pytest.approx([lrs[0] for lrs in seen])
    assert [m["lr"] for m in metrics] == pytest.approx([seen[49][0], seen[99][0]])


def test_evaluations_every_eval_steps_and_at_epoch_ends(controlled_run):
    metrics, out, _ = controlled_run
    lines = fe.metric_lines(out)
    assert [m["step"] for m in lines] == [20, 40, 50, 60, 80, 100]  # 50 steps an epoch
    assert [m["step"] for m in lines if "train_loss" in m] == [50, 100]
    for m in lines:
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["f1"] <= 1 and m["eval_loss"] > 0
    assert lines[-1]["accuracy"] == metrics[-1]["accuracy"] > 0.8


def test_the_model_is_the_best_evaluations(controlled_run):
    """model/ predicts the eval split with the best evaluation's accuracy: the first of
    the highest (a later equal one is not better)."""
    _, out, _ = controlled_run
    lines = fe.metric_lines(out)
    best = max(lines, key=lambda m: (m["accuracy"], -m["step"]))
    assert json.loads((out / "model" / "best.json").read_text())["step"] == best["step"]
    assert not (out / "best").exists()  # it became model/: no second copy (issue 36)
    args = json.loads((out / "args.json").read_text())
    eval_split = fe.select_splits(fe.load_splits(args["dataset"]), "text", "label")["eval"]
    predicted = [label for label, _ in fe.predict(out / "model", eval_split["text"], 64)]
    right = sum(p == str(y) for p, y in zip(predicted, eval_split["label"]))
    assert abs(best["accuracy"] * len(eval_split) - right) <= 1


def test_tensorboard_scalars_read_back(controlled_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, out, seen = controlled_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/samples_per_s", "eval/accuracy",
            "eval/f1", "eval/loss"} <= tags
    assert [e.step for e in events.Scalars("eval/accuracy")] == [20, 40, 50, 60, 80, 100]
    lrs = events.Scalars("train/learning_rate")
    assert [e.step for e in lrs] == list(range(1, 101))
    assert [e.value for e in lrs] == pytest.approx([lrs_[0] for lrs_ in seen], rel=1e-6)


def test_the_summary_says_the_schedule_decay_clipping_and_evaluation(tiny_model_dir,
                                                                     sentiment_dir, tmp_path,
                                                                     capsys):
    fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path, "--max-steps", "30",
                     "--warmup-ratio", "0.1", "--lr-scheduler-type", "linear"))
    out = capsys.readouterr().out
    summary = summary_of(out)
    assert summary["epochs"] == "1 (--max-steps 30)"
    assert summary["optimizer steps in total"] == "30"
    assert summary["lr schedule"] == "linear, warm-up 3 steps from 0, peak lr 0.001"
    assert summary["weight decay"] == "0.01, none on biases and LayerNorm weights"
    assert summary["gradient clipping"] == "none"
    assert summary["evaluation"] == "each epoch end"
    lines = fe.metric_lines(tmp_path)
    assert [(m["epoch"], m["step"]) for m in lines] == [(1, 30)]  # --max-steps ends the epoch
    assert "Accuracy: " in out and "(epoch 1 of 1:" in out


def test_early_stopping_stops_at_the_expected_evaluation(tiny_model_dir, sentiment_dir, tmp_path,
                                                        capsys):
    fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path, "--epochs", "3", "--eval-steps", "5",
                     "--load-best-model-at-end", "--early-stopping-patience", "2"))
    lines = fe.metric_lines(tmp_path)
    best, since, expected = None, 0, None
    for i, m in enumerate(lines):  # the Trainer's EarlyStoppingCallback, on these figures
        if best is None or m["accuracy"] > best:
            best, since = m["accuracy"], 0
        else:
            since += 1
        if since >= 2:
            expected = i
            break
    assert expected is not None and expected == len(lines) - 1  # it stopped, there
    assert lines[-1]["stopped_early"] and lines[-1]["step"] < 150
    out = capsys.readouterr().out
    assert f"early stopping at step {lines[-1]['step']}:" in out
    assert (tmp_path / "model").is_dir()
    # The run is finished: --resume has nothing to do, and says why.
    assert fe.cli(["--resume", str(tmp_path)]) == 0
    assert "stopped early" in capsys.readouterr().out


@pytest.mark.skipif(not fe.fp16_autocast_works("cpu"),
                    reason=f"torch {torch.__version__} has no float16 autocast on CPU")
def test_fp16_loss_scaling_skips_an_overflowing_step_and_learns():
    torch.manual_seed(0)
    model = tiny_electra(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cpu = torch.device("cpu")
    args = fe.parse_args(["--fp16"])
    optimizer = fe.adamw(model.parameters(), 1e-3, cpu, 0.0)
    train_step, _ = fe.torch_steps(model, model, optimizer, args, cpu, 1, torch.float16, fe.Ranks())
    update = next(cell.cell_contents for cell in train_step.__closure__  # the step's own
                  if isinstance(cell.cell_contents, fe.OptimizerStep))
    batch = {"input_ids": torch.randint(1000, 1100, (8, 16)), "labels": torch.tensor([0, 1] * 4)}
    batch["input_ids"][batch["labels"] == 1, 0] = 2000  # a token that tells the label
    update.scale.fill_(2.0 ** 100)  # float16 gradients overflow at this scale
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert torch.isfinite(train_step(batch))
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # skipped
    assert float(update.scale) == 2.0 ** 99  # and the scale halved
    update.scale.fill_(2.0 ** 10)
    losses = [float(train_step(batch)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                                  ((8, 0), torch.bfloat16),
                                                  ((9, 0), torch.bfloat16)])
def test_auto_precision_by_compute_capability(monkeypatch, capability, expected):
    """T4 (7.5) and V100 (7.0): float16 with loss scaling; A100 (8.0), H100 (9.0): bfloat16."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    dtype, words = fe.choose_precision(fe.parse_args([]), torch.device("cuda", 0), fe.Ranks())
    assert dtype == expected and f"compute capability {capability[0]}.{capability[1]}" in words
    assert fe.choose_precision(fe.parse_args([]), torch.device("cpu"), fe.Ranks()) == \
        (None, "float32")


BAD_CONTROLS = [
    (["--warmup-ratio", "1"], "error: --warmup-ratio 1.0: must be from 0 up to, not including, 1"),
    (["--warmup-ratio", "-0.1"], "error: --warmup-ratio -0.1: must be from 0 up to, not including, 1"),
    (["--warmup-steps", "-1"], "error: --warmup-steps -1: must be 0 or more"),
    (["--weight-decay", "-0.01"], "error: --weight-decay -0.01: must be from 0 up to, not including, 1"),
    (["--max-grad-norm", "-1"], "error: --max-grad-norm -1.0: must be more than 0, or 0 for no "
                                "clipping"),
    (["--eval-steps", "0"], "error: --eval-steps 0: must be more than 0 (a number below 1 is a "
                            "ratio of all training steps, as in the Trainer)"),
    (["--max-steps", "0"], "error: --max-steps 0: must be at least 1, or -1 for none (--epochs "
                           "decides)"),
    (["--early-stopping-patience", "2"], "error: --early-stopping-patience needs "
                                         "--load-best-model-at-end: early stopping keeps the "
                                         "best model, not the last"),
    (["--fp16", "--bf16", "yes"], "error: --fp16 and --bf16 yes: choose one precision"),
    (["--report-to", "wandb"], "error: argument --report-to: invalid choice: 'wandb' (choose "
                               "from 'none', 'tensorboard', 'all')"),
]


@pytest.mark.parametrize("argv, message", BAD_CONTROLS, ids=[" ".join(a) for a, _ in BAD_CONTROLS])
def test_a_control_out_of_range_is_one_error_line(capsys, tmp_path, argv, message):
    error = cli_error(capsys, ["--output-dir", str(tmp_path / "run"), *argv])
    assert error == message.replace("'none', 'tensorboard', 'all'", "none, tensorboard, all") \
        or error == message
    assert not (tmp_path / "run").exists()


def test_fp16_without_cpu_autocast_and_tensorboard_missing_are_one_error_line(
        capsys, tmp_path, monkeypatch, tiny_model_dir, sentiment_dir):
    monkeypatch.setattr(fe, "fp16_autocast_works", lambda device_type: False)
    argv = run_args(tiny_model_dir, sentiment_dir, tmp_path / "run")
    error = cli_error(capsys, [*argv, "--fp16"])
    assert error.startswith("error: --fp16: this torch") and "no float16 autocast on a CPU" in error
    monkeypatch.setitem(__import__("sys").modules, "tensorboard", None)  # not installed
    error = cli_error(capsys, [*argv, "--report-to", "tensorboard"])
    assert error.startswith("error: --report-to tensorboard needs the tensorboard package: "
                            "pip install tensorboard")
    assert not (tmp_path / "run").exists()


def test_pipelines_refuse_half_precision_and_say_they_run_float32(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    error = cli_error(capsys, ["--device", "cpu", "--stages", "2", "--bf16", "yes",
                               "--output-dir", str(tmp_path)])
    assert error == ("error: --bf16 yes: torchrun's pipeline stages are traced in float32; use "
                     "--stages 1 (data parallel)")
    ranks = fe.Ranks(0, 2, 2)
    assert fe.choose_precision(fe.parse_args([]), torch.device("cpu"), ranks) == \
        (None, "float32: pipeline stages are traced in float32")


def test_readme_lists_each_control_beside_the_trainers_name():
    readme = (ROOT / "README.md").read_text()
    for flag, trainer in [("--lr-scheduler-type", "lr_scheduler_type"),
                          ("--warmup-ratio", "warmup_ratio"), ("--warmup-steps", "warmup_steps"),
                          ("--weight-decay", "weight_decay"), ("--max-grad-norm", "max_grad_norm"),
                          ("--eval-steps", "eval_steps"),
                          ("--load-best-model-at-end", "load_best_model_at_end"),
                          ("--metric-for-best-model", "metric_for_best_model"),
                          ("--early-stopping-patience", "early_stopping_patience"),
                          ("--max-steps", "max_steps"), ("--fp16", "fp16"),
                          ("--report-to", "report_to")]:
        assert f"| `{flag}` | `{trainer}`" in readme, flag


def test_on_ipus_the_schedule_reaches_the_device_through_set_optimizer_once_per_call(
        fake_poptorch, tiny_model_dir, sentiment_dir, tmp_path):
    """2 host calls an epoch, each of 4 optimizer steps: the lr changes once per call, only
    through setOptimizer; --eval-steps 4 swaps the models mid-epoch, between two calls."""
    fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path, *IPU_ARGS,
                     "--lr-scheduler-type", "linear", "--warmup-steps", "4",
                     "--max-grad-norm", "0.5", "--eval-steps", "4"))
    schedule = fe.Schedule(fe.parse_args(["--lr", "1e-3", "--lr-scheduler-type", "linear",
                                          "--warmup-steps", "4"]), 16)
    calls_first_steps = [0, 4, 8, 12]
    assert fake_poptorch.DEVICE_LRS == pytest.approx(
        [schedule.lr_at(first) for first in calls_first_steps for _ in range(4)])
    set_optimizer = [e for e in fake_poptorch.EVENTS if e[0] == "setOptimizer"]
    assert len(set_optimizer) == 4  # the lr differs at every call: 0, peak, then decaying
    events = [e for e in fake_poptorch.EVENTS if e[0] in ("attach", "detach")][4:]  # after compiles
    mid_epoch_swap = [("detach", "training"), ("attach", "inference"), ("detach", "inference"),
                      ("attach", "training")]
    epoch = [("attach", "training")] + mid_epoch_swap + [("detach", "training"),
                                                         ("attach", "inference"),
                                                         ("detach", "inference")]
    assert events == epoch * 2
    lines = fe.metric_lines(tmp_path)
    assert [m["step"] for m in lines] == [4, 8, 12, 16]


def test_the_standin_keeps_host_changes_off_the_device_without_set_optimizer(fake_poptorch):
    """The stand-in's contract (PopTorch's docs): the device's optimizer values are the
    compiled ones until setOptimizer; an attribute not given to the constructor is constant."""
    model = torch.nn.Linear(4, 2)
    optimizer = fake_poptorch.optim.AdamW(model.parameters(), lr=0.1)  # weight_decay: constant
    training = fake_poptorch.trainingModel(
        WithIdentityLoss(model, torch.nn.functional.cross_entropy),
        optimizer=optimizer)
    x, y = torch.randn(1, 4), torch.tensor([1])
    training(x, y)
    optimizer.param_groups[0]["lr"] = 0.5  # on the host only
    training(x, y)
    assert fake_poptorch.DEVICE_LRS == [0.1, 0.1]
    training.setOptimizer(optimizer)
    training(x, y)
    assert fake_poptorch.DEVICE_LRS[-1] == 0.5
    optimizer.param_groups[0]["weight_decay"] = 0.0
    with pytest.raises(RuntimeError, match="weight_decay is a constant of the compiled graph"):
        training.setOptimizer(optimizer)


def test_ipu_controls_that_cannot_be_honoured_are_refused(fake_poptorch, capsys, tmp_path):
    for extra, message in [(["--fp16"], "error: --fp16 is for CUDA and CPU"),
                           (["--eval-steps", "6"], "error: --eval-steps 6: on IPUs a multiple of "
                                                   "--device-iterations (4)"),
                           (["--max-steps", "10"], "error: --max-steps 10: on IPUs a multiple of "
                                                   "--device-iterations (4)")]:
        error = cli_error(capsys, ["--device", "ipu", "--device-iterations", "4",
                                   "--output-dir", str(tmp_path / "run"), *extra])
        assert error.startswith(message), error
    assert not (tmp_path / "run").exists()


def test_killed_mid_warm_up_then_resumed_equals_the_unbroken_run(tiny_model_dir, sentiment_dir,
                                                                 tmp_path):
    """kill -9 at the first checkpoint (step 5 of a 20-step warm-up), then --resume: the
    schedule, clipping, evaluations, best model and patience go on as if never stopped."""
    import signal
    import subprocess
    import sys
    import time
    controls = ["--batch-size", "4", "--train-samples", "160", "--epochs", "1", "--save-every", "5",
                "--log-every", "1", "--lr-scheduler-type", "linear", "--warmup-steps", "20",
                "--max-grad-norm", "0.5", "--eval-steps", "10", "--load-best-model-at-end",
                "--early-stopping-patience", "50"]
    fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path / "unbroken", *controls))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "finetune_electra.py"),
                             *run_args(tiny_model_dir, sentiment_dir, out, *controls)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + HANG
    while not fe.list_checkpoints(out):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((fe.list_checkpoints(out)[0] / "state.json").read_text())
    assert 0 < state["global_step"] < 20  # mid-warm-up
    assert fe.cli(["--resume", str(out)]) == 0
    def figures(run, name):  # every number the run computed, in order (timings differ)
        text = (run / name).read_text()
        items = [json.loads(line) for line in text.splitlines()] if name.endswith(".jsonl") \
            else json.loads(text)
        items = items if isinstance(items, list) else [items]
        return [(k, v) for item in items for k, v in (
            item.items() if isinstance(item, dict) else enumerate(item))
            if "seconds" not in str(k) and "_per_s" not in str(k)]

    for name in ("loss_curve.json", "metrics.jsonl", "model/best.json"):
        a, b = figures(out, name), figures(tmp_path / "unbroken", name)
        assert [k for k, _ in a] == [k for k, _ in b], name
        assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-6), name
    from safetensors.torch import load_file
    a, b = (load_file(run / "model" / "model.safetensors") for run in (out, tmp_path / "unbroken"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)

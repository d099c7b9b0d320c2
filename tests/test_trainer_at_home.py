"""A Trainer user at home (issue 36): the TrainingArguments names and values they type, a
--max-steps run that a larger --max-steps continues exactly, --eval-strategy with early
stopping that counts only the evaluations it makes, a stopped run that keeps all it
measured, and nothing silent. On CPU, and on the PopTorch stand-in (tests/poptorch_standin.py,
not PopTorch); torchrun's layouts in test_torchrun.py."""

import json
import os
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file

import finetune_electra as fe
from conftest import IPU_ARGS, cli_error, run_args, summary_of

# --- the names and values a Trainer user types -------------------------------------------------

TRAINER_NAMES = [  # (the Trainer's flag and value, ours), each setting the same argument
    (["--learning-rate", "3e-5"], ["--lr", "3e-5"]),
    (["--num-train-epochs", "5"], ["--epochs", "5"]),
    (["--per-device-train-batch-size", "16"], ["--batch-size", "16"]),
    (["--per-device-eval-batch-size", "64"], ["--eval-batch-size", "64"]),
    (["--gradient-accumulation-steps", "4"], ["--gradient-accumulation", "4"]),
    (["--logging-steps", "50"], ["--log-every", "50"]),
    (["--save-steps", "500"], ["--save-every", "500"]),
    (["--save-total-limit", "3"], ["--keep", "3"]),
    (["--torch-compile"], ["--compile"]),
    (["--use-cpu"], ["--device", "cpu"]),
    (["--bf16"], ["--bf16", "yes"]),
    (["--bf16", "false"], ["--bf16", "no"]),
    (["--fp16", "true"], ["--fp16"]),
    (["--group-by-length"], ["--group-by-length", "yes"]),
    (["--train-sampling-strategy", "group_by_length"], ["--group-by-length", "yes"]),
    (["--train-sampling-strategy", "random"], ["--group-by-length", "no"]),
    (["--lr-scheduler-type", "constant_with_warmup"], ["--lr-scheduler-type", "constant"]),
    (["--load-best-model-at-end", "True", "--metric-for-best-model", "eval_loss"],
     ["--load-best-model-at-end", "--metric-for-best-model", "loss"]),
    (["--max-steps", "-1"], []),
    (["--max-grad-norm", "0"], []),
    (["--report-to", "none"], []),
]


@pytest.mark.parametrize("trainers, ours", TRAINER_NAMES, ids=[" ".join(t) for t, _ in TRAINER_NAMES])
def test_the_trainers_names_and_values_set_the_same_arguments(trainers, ours):
    assert vars(fe.parse_args(trainers)) == vars(fe.parse_args(ours))


def test_help_shows_each_trainer_name_beside_ours():
    text = fe.build_parser().format_help()
    for pair in ["--lr LR, --learning-rate LR", "--epochs EPOCHS, --num-train-epochs EPOCHS",
                 "--log-every LOG_EVERY, --logging-steps LOG_EVERY",
                 "--resume RESUME, --resume-from-checkpoint RESUME", "--eval-strategy"]:
        assert pair in text, pair


def test_the_readme_table_names_each_alias_beside_its_trainer_field():
    from conftest import ROOT
    readme = (ROOT / "README.md").read_text()
    for alias in ["--learning-rate", "--num-train-epochs", "--per-device-train-batch-size",
                  "--per-device-eval-batch-size", "--gradient-accumulation-steps",
                  "--logging-steps", "--save-steps", "--save-total-limit",
                  "--resume-from-checkpoint", "--torch-compile", "--use-cpu"]:
        assert f"(`{alias}`) | `{alias[2:].replace('-', '_')}`" in readme, alias
    assert "| `--eval-strategy` | `eval_strategy` | `epoch` (the tutorial's) | `no` |" in readme


def test_ratios_below_1_are_shares_of_all_steps_as_in_the_trainer():
    args = fe.parse_args(["--eval-steps", "0.25", "--save-every", "0.1", "--logging-steps", "0.05",
                          "--warmup-steps", "0.1", "--max-steps", "200"])
    plan = fe.StepPlan(args, steps_per_epoch=75)
    assert (plan.eval_steps, plan.save_every, plan.log_every) == (50, 20, 10)
    assert fe.Schedule(args, plan.total).warmup == 20  # transformers 5's warmup_steps ratio
    on_ipu = fe.StepPlan(args, steps_per_epoch=80, multiple=8)  # whole host calls
    assert (on_ipu.eval_steps, on_ipu.save_every, on_ipu.log_every) == (56, 24, 16)
    assert fe.StepPlan(fe.parse_args(["--epochs", "2.5"]), 20).total == 50  # fractional epochs


def test_eval_strategy_steps_takes_logging_steps_and_report_to_all_takes_tensorboard():
    args = fe.parse_args(["--eval-strategy", "steps", "--logging-steps", "7"])
    assert args.eval_steps == 7  # as the Trainer: eval_steps defaults to logging_steps
    assert fe.parse_args(["--report-to", "all"]).report_to == "tensorboard"  # installed here


def test_resume_from_checkpoint_takes_the_newest_checkpoint_or_true(tmp_path, capsys):
    run = tmp_path / "run"
    for name in ("step-00000010", "step-00000020"):
        (run / "checkpoints" / name).mkdir(parents=True)
        (run / "checkpoints" / name / "state.json").write_text("{}")
    (run / "args.json").write_text("{}")
    assert fe.resolve_resume_dir(str(run / "checkpoints" / "step-00000020")) == run
    assert fe.resolve_resume_dir("true", str(run)) == run
    error = cli_error(capsys, ["--resume-from-checkpoint", str(run / "checkpoints" / "step-00000010")])
    assert error == (f"error: --resume {run / 'checkpoints' / 'step-00000010'}: a run continues from "
                     f"its newest checkpoint, {run / 'checkpoints' / 'step-00000020'}; to train "
                     f"from this one, pass --model {run / 'checkpoints' / 'step-00000010'} in a new "
                     "--output-dir")


SILENT_BEFORE = [  # each did nothing, or dropped a setting, without a word
    (["--metric-for-best-model", "loss"], "error: --metric-for-best-model says which evaluation's "
     "model --load-best-model-at-end keeps: give both, or neither"),
    (["--warmup-ratio", "0.1", "--warmup-steps", "3"], "error: --warmup-ratio and --warmup-steps: "
     "give one (transformers 5 takes a ratio below 1 in --warmup-steps)"),
    (["--load-best-model-at-end", "--eval-strategy", "no"], "error: --load-best-model-at-end needs "
     "evaluations: --eval-strategy epoch or steps"),
    (["--eval-steps", "5", "--eval-strategy", "no"], "error: --eval-steps with --eval-strategy no: "
     "give --eval-strategy steps (or epoch) to evaluate"),
    (["--logging-steps", "2.5"], "error: argument --log-every/--logging-steps: 2.5: a whole number "
     "of steps, or a ratio below 1"),
    (["--device", "ipu", "--eval-batch-size", "64"], "error: --eval-batch-size: on IPUs and in "
     "torchrun pipelines an eval batch is --batch-size x --device-iterations (static shapes); "
     "leave it out"),
    (["--device", "cpu", "--stages", "2", "--eval-batch-size", "8", "RANK"], "error: "
     "--eval-batch-size: on IPUs and in torchrun pipelines an eval batch is --batch-size x "
     "--device-iterations (static shapes); leave it out"),  # RANK: as under torchrun
]


@pytest.mark.parametrize("argv, message", SILENT_BEFORE, ids=[" ".join(a) for a, _ in SILENT_BEFORE])
def test_what_was_silent_is_one_error_line(capsys, tmp_path, fake_poptorch, monkeypatch, argv,
                                           message):
    if "RANK" in argv:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        argv = [a for a in argv if a != "RANK"]
    assert cli_error(capsys, ["--output-dir", str(tmp_path / "run"), *argv]) == message
    assert not (tmp_path / "run").exists()


def test_resume_names_the_interpreter_that_ran_the_script(monkeypatch):
    """Before: always `python`, which outside the virtual environment lacks the packages."""
    monkeypatch.setattr(sys, "argv", ["finetune_electra.py"])
    monkeypatch.setattr(fe.shutil, "which", lambda name: "/usr/bin/" + name)
    assert fe.resume_command("runs/x") == f"{sys.executable} finetune_electra.py --resume runs/x"
    assert fe.resume_command("runs/x", 2).startswith(f"{sys.executable} -m torch.distributed.run "
                                                     "--nproc-per-node 2 ")
    monkeypatch.setattr(fe.shutil, "which", lambda name: os.path.join(
        os.path.dirname(sys.executable), name))  # this environment's
    assert fe.resume_command("runs/x") == "python finetune_electra.py --resume runs/x"


# --- a step budget that continues exactly ------------------------------------------------------

def assert_same_run(a, b):
    """Two run directories hold the same training: weights, loss curve, every line of
    metrics.jsonl (each epoch and evaluation, timings aside), the best model's step."""
    wa, wb = (load_file(run / "model" / "model.safetensors") for run in (a, b))
    for key in wb:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-6, atol=1e-7, msg=key)
    ca, cb = (json.loads((run / "loss_curve.json").read_text()) for run in (a, b))
    assert [p[0] for p in ca] == [p[0] for p in cb]  # the same steps
    assert [v for p in ca for v in p] == pytest.approx([v for p in cb for v in p], rel=1e-6)
    numbers = ("epoch", "step", "train_loss", "accuracy", "f1", "eval_loss", "lr")
    ea, eb = ([(k, m[k]) for m in fe.metric_lines(run) for k in numbers if k in m] for run in (a, b))
    assert [k for k, _ in ea] == [k for k, _ in eb]
    assert [v for _, v in ea] == pytest.approx([v for _, v in eb], rel=1e-6)
    best = [json.loads(p.read_text())["step"] if p.is_file() else None
            for p in (a / "model" / "best.json", b / "model" / "best.json")]
    assert best[0] == best[1]


@pytest.mark.parametrize("accumulation, first, then", [(1, 25, 50), (2, 7, 14)])
def test_a_larger_max_steps_continues_exactly_the_unbroken_run(
        capsys, tiny_model_dir, sentiment_dir, tmp_path, accumulation, first, then):
    """160 reviews, 8 an optimizer step: 20 steps an epoch (10 with 2 micro-batches of 8).
    Before: the first budget's last step was taken for an epoch end, so the resumed run skipped
    the rest of that epoch: it ended at 35 (11), and each later --resume trained nothing.
    Evaluations every 4 steps and the best model kept: the evaluation a budget's end makes
    (25, 7: not a multiple of 4) is reported, but neither counted nor kept in the state a
    larger budget goes on from, so evaluations and the best model are the unbroken run's."""
    common = ["--train-samples", "160", "--eval-samples", "40", "--log-every", "3",
              "--gradient-accumulation", str(accumulation), "--save-every", "5", "--keep", "9",
              "--eval-steps", "4", "--load-best-model-at-end"]
    budget, unbroken = tmp_path / "budget", tmp_path / "unbroken"
    fe.main(run_args(tiny_model_dir, sentiment_dir, budget, *common, "--max-steps", str(first)))
    ended = fe.metric_lines(budget)[-1]  # the partial epoch, evaluated at the budget's end
    assert ended["step"] == first and ended["partial"] and 0 <= ended["accuracy"] <= 1
    assert fe.cli(["--resume", str(budget)]) == 0  # finished: it says so, and how to go on
    said = capsys.readouterr().out
    assert (f"holds a finished run ({first} of --max-steps {first} optimizer steps, accuracy "
            in said and f"pass --max-steps {2 * first} to train on" in said)
    fe.main(["--resume", str(budget), "--max-steps", str(then)])
    summary = summary_of(capsys.readouterr().out)
    assert summary["optimizer steps in total"] == str(then)
    fe.main(run_args(tiny_model_dir, sentiment_dir, unbroken, *common, "--max-steps", str(then)))
    assert_same_run(budget, unbroken)
    assert fe.newest_state(budget)["global_step"] == then
    names = [c.name for c in fe.list_checkpoints(budget)]
    assert len({name[:13] for name in names}) == len(names), names  # no step saved twice


def test_on_ipus_a_larger_max_steps_continues_exactly(fake_poptorch, tiny_model_dir,
                                                      sentiment_dir, tmp_path):
    """The stand-in: 224 reviews are 2 host calls an epoch of 4 steps; --max-steps 4 ends the
    first epoch after one call, and --max-steps 12 goes on from its second call."""
    budget, unbroken = tmp_path / "budget", tmp_path / "unbroken"
    fe.main(run_args(tiny_model_dir, sentiment_dir, budget, *IPU_ARGS, "--max-steps", "4"))
    fe.main(["--resume", str(budget), "--max-steps", "12"])
    fe.main(run_args(tiny_model_dir, sentiment_dir, unbroken, *IPU_ARGS, "--max-steps", "12"))
    assert_same_run(budget, unbroken)


# --- --eval-strategy, and early stopping that counts only the evaluations it makes -------------

def trainers_early_stop(accuracies, patience):
    """The index of the evaluation at which EarlyStoppingCallback stops (None: never)."""
    best, since = None, 0
    for i, accuracy in enumerate(accuracies):
        best, since = (accuracy, 0) if best is None or accuracy > best else (best, since + 1)
        if since >= patience:
            return i
    return None


def test_eval_strategy_steps_evaluates_and_counts_every_eval_steps_only(
        monkeypatch, tiny_model_dir, sentiment_dir, tmp_path):
    """25 steps an epoch, an evaluation every 10: none at the epoch ends (25, 75) unless at
    a multiple of 10 (50). Before, epoch ends evaluated too and counted toward the patience.
    The bar has counted each step before the evaluation that follows it (before: after)."""
    positions, mid_epoch = [], fe.Evaluations.mid_epoch

    def at_each_evaluation(self, evaluate):
        positions.append((self.state["global_step"], self.progress.bar.n))
        return mid_epoch(self, evaluate)
    monkeypatch.setattr(fe.Evaluations, "mid_epoch", at_each_evaluation)
    out = tmp_path / "run"
    metrics = fe.main(run_args(tiny_model_dir, sentiment_dir, out, "--epochs", "3",
                               "--train-samples", "200", "--eval-strategy", "steps",
                               "--eval-steps", "10", "--eval-samples", "40",
                               "--load-best-model-at-end", "--early-stopping-patience", "3"))
    evaluations = [m for m in fe.metric_lines(out) if "accuracy" in m]
    assert all(m["step"] % 10 == 0 for m in evaluations)
    assert all(("accuracy" in m) == (m["step"] % 10 == 0) for m in metrics)  # 25, 75: not
    stop = trainers_early_stop([m["accuracy"] for m in evaluations], 3)
    assert (stop == len(evaluations) - 1 and evaluations[-1]["stopped_early"]) if stop is not None \
        else evaluations[-1]["step"] == 70
    eval_batches = 1  # 40 reviews, in one eval batch of 8 x 8
    assert positions == [(step, step + eval_batches * i) for i, (step, _) in enumerate(positions)]


def test_eval_strategy_no_evaluates_nothing_and_says_so(capsys, tiny_model_dir, sentiment_dir,
                                                        tmp_path):
    out = tmp_path / "run"
    metrics = fe.main(run_args(tiny_model_dir, sentiment_dir, out, "--epochs", "1",
                               "--train-samples", "40", "--eval-strategy", "no"))
    printed = capsys.readouterr().out
    assert summary_of(printed)["evaluation"] == "none (--eval-strategy no)"
    assert "Accuracy:" not in printed and "(epoch 1 of 1: train loss" in printed
    assert len(metrics) == 1 and "accuracy" not in metrics[0] and (out / "model").is_dir()
    assert fe.cli(["--resume", str(out)]) == 0  # finished, though without an accuracy
    assert "holds a finished run (1 of 1 epochs): nothing to resume" in capsys.readouterr().out


# --- a stopped run keeps all it measured -------------------------------------------------------

def test_a_stop_keeps_every_evaluation_and_the_loss_and_a_resume_adds_no_duplicate(
        monkeypatch, tiny_model_dir, sentiment_dir, tmp_path):
    """SIGINT just after the step-7 evaluation, with a loss reading every step: before, the
    directory held args.json and checkpoints/ only. TensorBoard, after the resume, holds each
    step once, as the loss curve does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    mid_epoch = fe.Evaluations.mid_epoch

    def stop_after_the_first(self, evaluate):
        mid_epoch(self, evaluate)
        if len(self.state["evaluations"]) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the handler notes it; the step ends; it stops
    monkeypatch.setattr(fe.Evaluations, "mid_epoch", stop_after_the_first)
    out = tmp_path / "run"
    argv = run_args(tiny_model_dir, sentiment_dir, out, "--epochs", "1", "--train-samples", "120",
                    "--eval-samples", "40", "--log-every", "1", "--eval-steps", "7",
                    "--report-to", "tensorboard")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as stopped:
            fe.main(argv)
    finally:  # a stopped run ignores further signals: this process goes on
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert stopped.value.code == 130
    lines = fe.metric_lines(out)
    assert [m["step"] for m in lines] == [7] and 0 <= lines[0]["accuracy"] <= 1
    assert [step for step, *_ in json.loads((out / "loss_curve.json").read_text())] == \
        list(range(1, 8))
    assert (out / "curves.png").is_file()
    monkeypatch.setattr(fe.Evaluations, "mid_epoch", mid_epoch)
    fe.main(["--resume", str(out)])
    lines = fe.metric_lines(out)
    assert [m["step"] for m in lines] == [7, 14, 15] and "train_loss" in lines[-1]  # 15 an epoch
    curve_steps = [step for step, *_ in json.loads((out / "loss_curve.json").read_text())]
    assert curve_steps == list(range(1, 16))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == curve_steps
    assert [e.step for e in events.Scalars("eval/accuracy")] == [7, 14, 15]

"""The IPU path against the PopTorch stand-in (tests/poptorch_standin.py), not on IPUs."""

import json
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import finetune_electra as fe
from conftest import (HANG, IPU_ARGS, ROOT, WithIdentityLoss, assert_accuracy_of_saved_model,
                      cli_error, run_args, standin_env, summary_of)

SCRIPT = str(ROOT / "finetune_electra.py")


@pytest.fixture
def ipu_run(fake_poptorch, tiny_model_dir, sentiment_dir, tmp_path, monkeypatch, capsys):
    placed = []
    begin_block = fake_poptorch.BeginBlock

    def record(module, user_id=None, ipu_id=None):
        placed.append((user_id, ipu_id))
        return begin_block(module, user_id, ipu_id)

    monkeypatch.setattr(fake_poptorch, "BeginBlock", record)
    metrics = fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path / "run", *IPU_ARGS,
                               "--log-every", "1"))
    return metrics, placed, tmp_path / "run", capsys.readouterr().out


def test_begin_blocks_follow_the_stage_plan(ipu_run, tiny_model_dir):
    _, placed, _, _ = ipu_run
    model, _ = fe.load_model(str(tiny_model_dir), ["0", "1"])
    assert placed == fe.plan_stages(model, 4)
    assert sorted({ipu for _, ipu in placed}) == [0, 1, 2, 3]


def test_identity_loss_is_traced_once_in_the_training_graph_only(ipu_run, fake_poptorch):
    # Each PopTorch model traces a shallow copy of the wrapper once, at compile; the
    # inference copy's own `training` flag is still True, so the wrapper must read
    # the wrapped model's flag or the inference graph gets an identity_loss too.
    assert fake_poptorch.IDENTITY_LOSSES == [("training", "none")]


def test_attach_detach_order_is_the_tutorials(ipu_run, fake_poptorch):
    events = [e for e in fake_poptorch.EVENTS if e[0] != "call"]
    setup = [("compile", "training"), ("attach", "training"), ("detach", "training"),
             ("compile", "inference"), ("attach", "inference"), ("detach", "inference")]
    epoch = [("attach", "training"), ("detach", "training"),
             ("attach", "inference"), ("detach", "inference")]
    assert events == setup + epoch * 2
    calls = [e[1] for e in fake_poptorch.EVENTS if e[0] == "call"]
    # each epoch: 2 training host batches, then ceil(50 / 16) = 4 eval host batches
    assert calls == (["training"] * 2 + ["inference"] * 4) * 2


def test_training_changes_weights_and_inference_sees_them(ipu_run, tiny_model_dir):
    metrics, _, out, _ = ipu_run
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    # The accuracy the inference model reported is that of the trained host weights.
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert 0.0 <= metrics[-1]["accuracy"] <= 1.0
    assert_accuracy_of_saved_model(metrics, out)


def test_steps_and_losses_are_counted_per_optimizer_step(ipu_run):
    """One host call runs device-iterations optimizer steps, each with its own loss."""
    _, _, out, stdout = ipu_run
    summary = summary_of(stdout)
    # 224 samples / (4 per micro-batch x 4 device iterations x 7 accumulated) = 2 calls per
    # epoch, each of 4 optimizer steps of 28 samples
    assert summary["host batch"] == "112 samples"
    assert summary["samples per optimizer step"] == "28"
    assert summary["optimizer steps per epoch"] == "8"
    assert summary["optimizer steps in total"] == "16"
    assert summary["device"] == "IPU, 4 pipeline stages x 1 replica(s) = 4 IPUs"
    curve = json.loads((out / "loss_curve.json").read_text())
    assert [step for step, *_ in curve] == list(range(1, 17))  # --log-every 1: every step
    assert len({round(loss, 6) for _, loss, *_ in curve}) > 8  # each step's own loss, not a repeat
    state = json.loads((fe.list_checkpoints(out)[-1] / "state.json").read_text())
    assert state["global_step"] == 16
    assert "pipeline stage plan (4 stages, applied with poptorch.BeginBlock)" in stdout


def test_a_non_finite_loss_names_the_optimizer_step(fake_poptorch, monkeypatch, capsys,
                                                    tiny_model_dir, sentiment_dir, tmp_path):
    from transformers import ElectraForSequenceClassification
    forward, calls = ElectraForSequenceClassification.forward, []

    def forward_with_nan(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) == 1 + 14 + 1:  # the compile trace, 14 good micro-batches, then NaN
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(ElectraForSequenceClassification, "forward", forward_with_nan)
    err = cli_error(capsys, run_args(tiny_model_dir, sentiment_dir, tmp_path, *IPU_ARGS))
    # micro-batch 15 belongs to optimizer step 3 (7 micro-batches a step)
    assert "the loss became nan at epoch 1, step 3 (the IPU had already applied that step)" in err


def test_eval_with_output_mode_all_returns_every_sample(fake_poptorch, tiny_model_dir):
    model, _ = fe.load_model(str(tiny_model_dir), ["0", "1"], eager_attention=True)
    opts = fe.ipu_options(fe.parse_args(["--device-iterations", "8"]), 1, training=False)
    assert opts.output_mode == fake_poptorch.OutputMode.All
    wrapped = fe.IPUWrapper(model).eval()
    inference = fake_poptorch.inferenceModel(wrapped, opts)
    ids = torch.randint(1000, 2000, (32, 16))
    loss, logits = inference(ids, torch.ones_like(ids), torch.zeros(32, dtype=torch.long))
    assert logits.shape == (32, 2)  # batch 4 x 8 device iterations: one row per sample
    assert loss.shape == (8,)


def test_anchor_mode_is_used_on_sdks_before_2_4(fake_poptorch, monkeypatch):
    chosen = []

    class OldOptions:  # SDK 2.3's: anchorMode, and no outputMode yet
        def __getattr__(self, name):
            if name == "outputMode":
                raise AttributeError(name)
            return lambda *args: chosen.append((name, *args)) or self

    monkeypatch.setattr(fake_poptorch, "Options", OldOptions)
    monkeypatch.setattr(fake_poptorch, "AnchorMode", fake_poptorch.OutputMode, raising=False)
    fe.ipu_options(fe.parse_args([]), 1, training=False)
    assert ("anchorMode", fake_poptorch.OutputMode.All) in chosen


def test_pipelined_training_without_enough_accumulation_fails_as_on_sdk_2_4(
        fake_poptorch, tiny_model_dir, sentiment_dir, tmp_path):
    with pytest.raises(RuntimeError, match="gradientAccumulation >= 7"):
        fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path, *IPU_ARGS,
                         "--gradient-accumulation", "1", "--train-samples", "400"))


def test_device_iterations_must_fill_the_pipeline(fake_poptorch, tiny_model_dir, sentiment_dir,
                                                  tmp_path):
    with pytest.raises(fe.FinetuneError, match="cannot fill a 4-stage pipeline"):
        fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path, *IPU_ARGS,
                         "--device-iterations", "2"))


def test_ipu_runs_with_static_shapes_only(fake_poptorch, tiny_model_dir, sentiment_dir, tmp_path):
    with pytest.raises(fe.FinetuneError, match="IPU graphs and traced pipelines need static shapes"):
        fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path, *IPU_ARGS, "--padding", "dynamic"))


@pytest.mark.parametrize("stages", ["3", "5", "6", "7"])
def test_ipu_counts_that_are_not_a_power_of_two_are_refused_before_loading(
        fake_poptorch, capsys, stages, tmp_path):
    err = cli_error(capsys, ["--device", "ipu", "--ipus", stages, "--device-iterations", "8",
                             "--dataset", "./nowhere", "--output-dir", str(tmp_path)])
    assert f"--ipus {stages} x --replicas 1 = {stages} IPUs: PopTorch reserves IPUs in powers of two" in err


def test_the_standin_refuses_three_ipus_as_poptorch_does(fake_poptorch, tiny_model_dir):
    model, _ = fe.load_model(str(tiny_model_dir), ["0", "1"], eager_attention=True)
    fe.place_on_ipus(model, fe.plan_stages(model, 3))
    opts = fe.ipu_options(fe.parse_args(["--device-iterations", "8"]), 1, training=False)
    ids = torch.randint(1000, 2000, (32, 16))
    with pytest.raises(RuntimeError, match="must reserve a minimum of 4"):
        fake_poptorch.inferenceModel(fe.IPUWrapper(model).eval(), opts).compile(
            ids, torch.ones_like(ids), torch.zeros(32, dtype=torch.long))


def test_a_train_set_smaller_than_one_host_batch_is_a_clear_error(
        fake_poptorch, capsys, tiny_model_dir, sentiment_dir, tmp_path):
    err = cli_error(capsys, run_args(tiny_model_dir, sentiment_dir, tmp_path, *IPU_ARGS,
                                     "--train-samples", "100"))
    assert ("the train split has 100 samples, fewer than one IPU host batch "
            "(4 x 4 device iterations x 7 accumulated) (112)") in err


@pytest.mark.parametrize("flag", [["--on-nan", "skip"], ["--save-every", "5"]])
def test_what_an_ipu_cannot_do_is_refused_before_work(fake_poptorch, capsys, flag, tmp_path):
    err = cli_error(capsys, ["--device", "ipu", *flag, "--dataset", "./nowhere",
                             "--output-dir", str(tmp_path)])
    assert "not" in err and "IPU" in err and flag[0] in err


def test_models_are_loaded_with_eager_attention_on_ipu(fake_poptorch, tiny_model_dir,
                                                       sentiment_dir, tmp_path, monkeypatch):
    """PopTorch has no handler for scaled_dot_product_attention: the stand-in refuses it."""
    loaded = []
    load_model = fe.load_model

    def spy(name, labels, eager_attention=False, say=print):
        model, tokenizer = load_model(name, labels, eager_attention, say)
        loaded.append(model.config._attn_implementation)
        return model, tokenizer

    monkeypatch.setattr(fe, "load_model", spy)
    fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path, *IPU_ARGS, "--epochs", "1"))
    assert loaded == ["eager"]


def test_the_standin_refuses_sdpa_as_poptorch_does(fake_poptorch):
    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v), q.sum()

    x = torch.randn(8, 2, 4, 16)
    with pytest.raises(RuntimeError, match="no handler for aten::scaled_dot_product_attention"):
        fake_poptorch.inferenceModel(Attention(), fake_poptorch.Options().deviceIterations(8)).compile(
            x, x, x)


@pytest.mark.parametrize("op, message", [
    (lambda x: x + torch.eye(x.shape[-1]), r"Unsupported ops found in compiled model: \[aten::eye\]"),
    (lambda x: x + torch.nonzero(x > 0).sum(), r"Unsupported ops found in compiled model: \[aten::nonzero\]"),
    (lambda x: x + (x > 0).long().cumsum(-1), "cumsum over integers"),
])
def test_the_standin_refuses_ops_poptorch_has_no_handler_for(fake_poptorch, op, message):
    """What the packed graph used to build its mask (eye) and positions (integer cumsum)."""
    class Model(torch.nn.Module):
        def forward(self, x):
            return op(x)

    opts = fake_poptorch.Options().deviceIterations(8)
    with pytest.raises(RuntimeError, match=message):
        fake_poptorch.inferenceModel(Model(), opts).compile(torch.randn(8, 4))
    op = lambda x: x.cumsum(-1)  # noqa: E731 - a float cumsum, which PopTorch handles, compiles
    fake_poptorch.inferenceModel(Model(), opts).compile(torch.randn(8, 4))


def test_a_poptorch_that_refuses_this_torch_is_one_clear_line(tmp_path):
    env = standin_env(tmp_path, POPTORCH_STANDIN_TORCH="0.0.1")
    for device in ("ipu", "auto"):
        proc = subprocess.run([sys.executable, SCRIPT, "--device", device,
                               "--output-dir", str(tmp_path / "out")],
                              capture_output=True, text=True, env=env, timeout=HANG)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        [error] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert ("PopTorch is installed but will not import (This version of PopTorch only works "
                f"with torch==0.0.1 but the version installed is {torch.__version__})") in error
        assert "pip install -r requirements-ipu.txt" in error


def run_script(argv, env):
    proc = subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True,
                          env=env, timeout=HANG)
    return proc


def test_an_ipu_run_killed_mid_run_resumes_with_the_same_weights_and_moments(
        tiny_model_dir, sentiment_dir, tmp_path):
    argv = [*IPU_ARGS[:-2], "--max-length", "32", "--epochs", "2"]
    unbroken = run_script(run_args(tiny_model_dir, sentiment_dir, tmp_path / "unbroken", *argv),
                          standin_env(tmp_path))
    assert unbroken.returncode == 0, unbroken.stderr[-2000:]
    # The training model's attaches: compile, epoch 1, epoch 2: killed as epoch 2 starts.
    killed = run_script(run_args(tiny_model_dir, sentiment_dir, tmp_path / "killed", *argv),
                        standin_env(tmp_path, POPTORCH_STANDIN_SIGKILL_AT_ATTACH="3"))
    assert killed.returncode == -signal.SIGKILL
    assert [c.name for c in fe.list_checkpoints(tmp_path / "killed")] == ["step-00000008-end"]
    resumed = run_script(["--resume", str(tmp_path / "killed")], standin_env(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "(epoch 2, step 0)" in resumed.stdout

    [a, b] = [fe.list_checkpoints(tmp_path / run)[-1] for run in ("unbroken", "killed")]
    assert a.name == b.name == "step-00000016-end"
    for name in ("model.safetensors", "optimizer.safetensors"):
        tensors_a, tensors_b = load_file(a / name), load_file(b / name)
        assert tensors_a.keys() == tensors_b.keys()
        for key in tensors_a:
            torch.testing.assert_close(tensors_b[key], tensors_a[key], rtol=1e-5, atol=1e-7)
    moments = [k for k in load_file(a / "optimizer.safetensors") if k.startswith("ipu_state/")]
    assert any(k.startswith("ipu_state/Accl1___") for k in moments)  # Adam's moments, saved
    assert any(k.startswith("ipu_state/Accl2___") for k in moments)


def test_an_ipu_checkpoint_does_not_resume_on_cpu_and_back(capsys, tiny_model_dir, sentiment_dir,
                                                            tmp_path, fake_poptorch):
    out = tmp_path / "ipu"
    fe.main(run_args(tiny_model_dir, sentiment_dir, out, *IPU_ARGS, "--epochs", "1"))
    err = cli_error(capsys, ["--resume", str(out), "--device", "cpu", "--epochs", "2"])
    assert "was written on an IPU: resume it with --device ipu" in err


# --- replicas of the pipeline and the executable cache (IPU-POD scale) ------------------

@pytest.mark.parametrize("layout,expected", [
    # 4 stages x 2 replicas: host batch 4 x 4 x 7 x 2 = 224, 1 call of 4 steps per epoch
    (["--replicas", "2", "--train-samples", "224"],
     {"device": "IPU, 4 pipeline stages x 2 replica(s) = 8 IPUs", "host batch": "224 samples",
      "samples per optimizer step": "56", "optimizer steps per epoch": "4"}),
    # 2 stages x 4 replicas, batch 2: host batch 2 x 4 x 3 x 4 = 96, 2 calls of 4 steps
    (["--replicas", "4", "--ipus", "2", "--batch-size", "2", "--train-samples", "192"],
     {"device": "IPU, 2 pipeline stages x 4 replica(s) = 8 IPUs", "host batch": "96 samples",
      "samples per optimizer step": "24", "optimizer steps per epoch": "8"}),
])
def test_replicas_multiply_the_host_batch_and_every_eval_sample_is_predicted_once(
        fake_poptorch, capsys, tiny_model_dir, sentiment_dir, tmp_path, layout, expected):
    out = tmp_path / "run"
    metrics = fe.main(run_args(tiny_model_dir, sentiment_dir, out, *IPU_ARGS, *layout,
                               "--epochs", "1", "--log-every", "1"))
    summary = summary_of(capsys.readouterr().out)
    assert {key: summary[key] for key in expected} == expected
    steps = int(expected["optimizer steps per epoch"])
    assert [s for s, *_ in json.loads((out / "loss_curve.json").read_text())] == \
        list(range(1, steps + 1))
    # 50 eval reviews in host batches of 4 x 4 x replicas rows: padded, each predicted once
    assert_accuracy_of_saved_model(metrics, out)


def test_replicas_get_rows_of_their_own_and_average_their_gradients(fake_poptorch):
    """Two replicas with one micro-batch each make one step, as one replica with both."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)

    def with_loss():
        return WithIdentityLoss(layer, lambda out, y: torch.nn.functional.mse_loss(
            out.squeeze(-1), y))

    x, y = torch.randn(8, 4), torch.randn(8)
    results = []
    for replicas, batch in ((2, 4), (1, 8)):
        layer.load_state_dict({"weight": torch.ones(1, 4), "bias": torch.zeros(1)})
        fake_poptorch.reset()
        optimizer = fake_poptorch.optim.AdamW(layer.parameters(), lr=0.1)
        opts = fake_poptorch.Options().replicationFactor(replicas)
        model = fake_poptorch.trainingModel(with_loss().train(), opts, optimizer)
        model(x, y)
        model.detachFromDevice()
        results.append(layer.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1])
    with pytest.raises(RuntimeError, match="two replicas got the same rows"):
        fake_poptorch.trainingModel(with_loss().train(),
                                    fake_poptorch.Options().replicationFactor(2),
                                    fake_poptorch.optim.AdamW(layer.parameters()))(
            torch.cat([x[:4], x[:4]]), torch.cat([y[:4], y[:4]]))


@pytest.mark.parametrize("cache", ["cache-dir", "none"])
def test_the_executable_cache_is_given_to_both_models(fake_poptorch, tiny_model_dir,
                                                      sentiment_dir, tmp_path, cache):
    path = str(tmp_path / cache) if cache != "none" else "none"
    fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path / "run", *IPU_ARGS, "--epochs", "1",
                     "--executable-cache", path))
    expected = None if cache == "none" else path
    assert fake_poptorch.CACHES == [("training", expected), ("inference", expected)]


def test_replica_and_stage_counts_multiply_to_a_power_of_two(fake_poptorch, capsys, tmp_path):
    err = cli_error(capsys, ["--device", "ipu", "--ipus", "4", "--replicas", "3",
                             "--dataset", "./nowhere", "--output-dir", str(tmp_path)])
    assert "--ipus 4 x --replicas 3 = 12 IPUs: PopTorch reserves IPUs in powers of two" in err


def test_replicas_are_for_ipus(capsys, tmp_path):
    err = cli_error(capsys, ["--device", "cpu", "--replicas", "2", "--dataset", "./nowhere",
                             "--output-dir", str(tmp_path)])
    assert "--replicas is for IPUs" in err and "torchrun" in err


def test_standin_binds_inputs_by_name_as_poptorch_does(fake_poptorch):
    """Named inputs in any order bind to forward's parameters; the names are fixed at compile."""
    class Sum(torch.nn.Module):
        def forward(self, a, b, c=None):
            return (a + b if c is None else a + b + c,)

    model = fake_poptorch.inferenceModel(Sum(), fake_poptorch.Options())
    ones = torch.ones(2, 3)
    assert torch.equal(model(b=ones, a=2 * ones)[0], 3 * ones)
    assert torch.equal(model(2 * ones, ones)[0], 3 * ones)  # by position: the same names
    with pytest.raises(RuntimeError, match=r"compiled with arguments \('a', 'b'\), called with "
                                           r"\('a', 'b', 'c'\)"):
        model(a=ones, b=ones, c=ones)
    with pytest.raises(AssertionError, match="d is not a valid parameter"):
        model(a=ones, d=ones)

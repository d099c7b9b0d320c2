"""The IPU path against the PopTorch stand-in (tests/poptorch_standin.py), not on IPUs."""

import pytest
import torch
from safetensors.torch import load_file

import finetune_electra as fe
from conftest import cpu_accuracy, run_args

IPU_ARGS = ["--device", "ipu", "--device-iterations", "4", "--batch-size", "4",
            "--train-samples", "224", "--eval-samples", "50", "--max-length", "32"]


@pytest.fixture
def ipu_run(fake_poptorch, tiny_model_dir, sentiment_dir, tmp_path, monkeypatch):
    placed = []
    begin_block = fake_poptorch.BeginBlock

    def record(module, user_id=None, ipu_id=None):
        placed.append((user_id, ipu_id))
        return begin_block(module, user_id, ipu_id)

    monkeypatch.setattr(fake_poptorch, "BeginBlock", record)
    metrics = fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path / "run", *IPU_ARGS))
    return metrics, placed, tmp_path / "run"


def test_begin_blocks_follow_the_stage_plan(ipu_run, tiny_model_dir):
    _, placed, _ = ipu_run
    model, _ = fe.load_model(str(tiny_model_dir), ["0", "1"])
    assert placed == fe.plan_stages(model, 4)
    assert sorted({ipu for _, ipu in placed}) == [0, 1, 2, 3]


def test_identity_loss_only_in_training_with_reduction_none(ipu_run, fake_poptorch):
    # 224 samples / (4 per micro-batch x 4 device iterations x 7 accumulated) = 2 host batches
    # per epoch, 2 epochs: 2 x 2 x 28 micro-batches went through the training graph.
    assert fake_poptorch.IDENTITY_LOSSES == ["none"] * (2 * 2 * 4 * 7)


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
    metrics, _, out = ipu_run
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    # The accuracy the inference model reported is that of the trained host weights.
    model, tokenizer = fe.load_model(str(out / "model"), ["0", "1"])
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert 0.0 <= metrics[-1]["accuracy"] <= 1.0
    assert metrics[-1]["accuracy"] == pytest.approx(cpu_accuracy(out), abs=1e-9)


def test_eval_with_output_mode_all_returns_every_sample(fake_poptorch, tiny_model_dir):
    model, _ = fe.load_model(str(tiny_model_dir), ["0", "1"])
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

    class OldOptions:
        def anchorMode(self, mode):
            chosen.append(mode)
            return self

    monkeypatch.setattr(fake_poptorch, "AnchorMode", fake_poptorch.OutputMode, raising=False)
    fe.set_output_all(OldOptions())
    assert chosen == [fake_poptorch.OutputMode.All]


def test_pipelined_training_without_enough_accumulation_fails_as_on_sdk_2_4(
        fake_poptorch, tiny_model_dir, sentiment_dir, tmp_path):
    with pytest.raises(RuntimeError, match="gradientAccumulation >= 7"):
        fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path, *IPU_ARGS,
                         "--gradient-accumulation", "1"))


def test_device_iterations_must_fill_the_pipeline(fake_poptorch, tiny_model_dir, sentiment_dir,
                                                  tmp_path):
    with pytest.raises(fe.FinetuneError, match="cannot fill a 4-stage pipeline"):
        fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path, *IPU_ARGS,
                         "--device-iterations", "2"))


def test_ipu_runs_with_static_shapes_only(fake_poptorch, tiny_model_dir, sentiment_dir, tmp_path):
    with pytest.raises(fe.FinetuneError, match="IPU graphs and traced pipelines need static shapes"):
        fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path, *IPU_ARGS, "--padding", "dynamic"))

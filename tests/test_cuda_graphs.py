"""On a GPU only (benchmarks/gpu_check.py runs this file on the lent one): a train or eval
step replayed from a CUDA graph computes what the eager step computes, dropout included."""

import pytest
import torch

import finetune_electra as fe
from conftest import run_args, summary_of, tiny_electra

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def steps_of_a_fresh_model(bf16=False, *argv):
    torch.manual_seed(0)  # the same initial weights for every caller
    model = tiny_electra(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1).to(CUDA)
    optimizer = fe.adamw(model.parameters(), 1e-3, CUDA)
    args = fe.parse_args(["--on-nan", "stop", *argv])
    train_step, eval_step = fe.torch_steps(model, model, optimizer, args, CUDA, 2,
                                           torch.bfloat16 if bf16 else None, fe.Ranks())
    return model, fe.StepGraphs(train_step, eval_step), optimizer


def random_batches(lengths, rows=8):
    generator = torch.Generator().manual_seed(1)
    batches = []
    for n in lengths:
        mask = torch.ones(rows, n, dtype=torch.long)
        mask[: rows // 2, n // 2:] = 0  # padding in half the rows
        batches.append({"input_ids": torch.randint(1000, 2000, (rows, n), generator=generator),
                        "attention_mask": mask,
                        "labels": torch.randint(0, 2, (rows,), generator=generator)})
    return [fe.to_device(b, CUDA) for b in batches]


@pytest.mark.parametrize("bf16", [False, True])
def test_graphed_steps_give_the_eager_losses_and_weights(bf16):
    """Two shapes, alternating, over 8 steps with dropout on, gradient accumulation of 2."""
    batches = random_batches([64, 128] * 4)
    eager_model, eager, _ = steps_of_a_fresh_model(bf16)
    torch.cuda.manual_seed(7)
    eager_losses = torch.stack([eager.run("train", b) for b in batches]).tolist()

    graphed_model, graphed, _ = steps_of_a_fresh_model(bf16)
    graphed.capture("train", batches[:2])
    assert graphed.failed is None and len(graphed.graphs) == 2
    torch.cuda.manual_seed(7)  # a replay draws dropout from where the generator is, as eager
    graphed_losses = torch.stack([graphed.run("train", b) for b in batches]).tolist()

    assert graphed_losses == pytest.approx(eager_losses, rel=1e-5)
    assert len(set(graphed_losses)) > len(batches) // 2  # each step's own loss (bf16: rounded)
    for (name, a), b in zip(eager_model.named_parameters(), graphed_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_a_graphed_eval_step_gives_the_eager_logits():
    batch = random_batches([128])[0]
    _, steps, _ = steps_of_a_fresh_model()
    eager = steps.run("eval", batch)
    steps.capture("eval", [batch])
    torch.testing.assert_close(steps.run("eval", {**batch, "input_ids": batch["input_ids"] + 1}),
                               steps.steps["eval"]({**batch, "input_ids": batch["input_ids"] + 1}))
    torch.testing.assert_close(steps.run("eval", batch), eager)


def test_a_non_finite_step_is_skipped_on_the_device_inside_the_graph():
    """--on-nan stop: the bad step and every later one leave the weights as they were."""
    batches = random_batches([64] * 4)
    model, steps, _ = steps_of_a_fresh_model()
    steps.capture("train", batches[:1])
    steps.run("train", batches[0])
    poisoned = "electra.embeddings.LayerNorm.weight"
    model.get_parameter(poisoned).data.fill_(float("nan"))
    before = {name: p.detach().clone() for name, p in model.named_parameters() if name != poisoned}
    losses = [steps.run("train", b) for b in batches[1:]]
    assert not any(torch.isfinite(loss) for loss in losses)
    for name, p in model.named_parameters():
        if name != poisoned:
            assert torch.equal(p, before[name]), name


def test_the_cli_on_cuda_captures_its_buckets_and_learns(tiny_model_dir, sentiment_dir,
                                                          tmp_path, capsys):
    metrics = fe.main(run_args(tiny_model_dir, sentiment_dir, tmp_path, "--device", "cuda",
                               "--epochs", "3"))
    summary = summary_of(capsys.readouterr().out)
    assert summary["padding"] == "buckets, at most 64 tokens"
    assert summary["train and eval steps"].startswith("CUDA graphs, 2 shapes captured")
    assert max(m["accuracy"] for m in metrics[-2:]) > 0.9
    assert metrics[-1]["train_loss"] < 0.7 * metrics[0]["train_loss"]
    assert metrics[0]["warmup_seconds"] > 0 and metrics[0]["peak_memory_gib"] > 0


def test_a_graphed_step_follows_the_schedule_and_clips_inside_the_graph():
    """Issue 29: the lr is a device tensor the graph reads at each replay (not a float baked
    in at capture), and clipping runs inside the graph: graphed = eager, step by step."""
    batches = random_batches([64, 128] * 4)
    runs = []
    for capture in (False, True):
        schedule = fe.Schedule(fe.parse_args(["--lr", "1e-3", "--lr-scheduler-type", "linear",
                                              "--warmup-steps", "3"]), len(batches))
        model, steps, optimizer = steps_of_a_fresh_model(False, "--max-grad-norm", "0.05")
        assert torch.is_tensor(optimizer.param_groups[0]["lr"])
        if capture:
            steps.capture("train", batches[:2])
            assert steps.failed is None and len(steps.graphs) == 2
        torch.cuda.manual_seed(7)
        losses = []
        for step, batch in enumerate(batches):
            schedule.update(optimizer, step)
            losses.append(steps.run("train", batch))
        runs.append((model, torch.stack(losses).tolist()))
    (eager_model, eager_losses), (graphed_model, graphed_losses) = runs
    assert graphed_losses == pytest.approx(eager_losses, rel=1e-5)
    for (name, a), b in zip(eager_model.named_parameters(), graphed_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)

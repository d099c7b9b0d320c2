#!/usr/bin/env python
"""Fine-tuning a pretrained transformer: ELECTRA on IMDB movie-review sentiment.

This is Graphcore's tutorial "Fine-tuning a pretrained transformer" as one script
that runs everywhere. On a machine with IPUs (PopTorch importable) it follows the
tutorial step by step: four pipeline stages placed with `poptorch.BeginBlock`,
`trainingModel`/`inferenceModel`, device iterations and anchor (output) modes. On
CUDA or CPU it runs the same recipe with plain PyTorch, padding each batch only
to its longest review instead of to 512 tokens (see --padding).

    python finetune_electra.py                        # the tutorial's recipe
    python finetune_electra.py --model DIR --dataset DIR --train-samples 2000

Read it top to bottom: arguments, data, model, the stage plan, the IPU models,
the training loop, checkpoints, and main() that puts them together.
"""

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import accuracy_score
from tqdm.auto import tqdm

try:  # PopTorch comes with Graphcore's Poplar SDK; without it we run on CUDA or CPU.
    import poptorch
except ImportError:
    poptorch = None

import datasets
import transformers
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset, load_from_disk
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer


class FinetuneError(Exception):
    """A problem the user can fix: printed as one line, without a traceback."""


# ----------------------------------------------------------------------------
# 1. Arguments: the defaults are the tutorial's recipe.
# ----------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(
        description="Fine-tune ELECTRA (or any BERT-family model) for text classification, "
        "as in Graphcore's tutorial, on IPU, CUDA or CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--model", default="google/electra-small-generator",
                      help="hub name or a directory saved with save_pretrained")
    data.add_argument("--dataset", default="imdb",
                      help="hub name, a save_to_disk directory, a directory of "
                      "train/test parquet|csv|json(l) files, or the aclImdb folder")
    data.add_argument("--text-column", default="text")
    data.add_argument("--label-column", default="label")
    data.add_argument("--label-names", default=None,
                      help="comma-separated names for integer labels 0,1,... (e.g. neg,pos)")
    data.add_argument("--max-length", type=int, default=512, help="tokens kept per text")
    data.add_argument("--padding", choices=["auto", "max_length", "dynamic"], default="auto",
                      help="max_length pads every text to --max-length (the tutorial; IPUs "
                      "need static shapes); dynamic pads each batch to its longest text. "
                      "auto: max_length on IPU, dynamic elsewhere")
    data.add_argument("--group-by-length", choices=["auto", "yes", "no"], default="auto",
                      help="batch texts of similar length together (auto: with dynamic padding)")
    data.add_argument("--train-samples", type=int, default=None,
                      help="train on a random subset of this size (seeded)")
    data.add_argument("--eval-samples", type=int, default=None,
                      help="evaluate on a random subset of this size (seeded)")

    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--batch-size", type=int, default=4, help="samples per micro-batch")
    train.add_argument("--eval-batch-size", type=int, default=None,
                       help="default: batch size x device iterations, the tutorial's "
                       "eval host batch")
    train.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate")
    train.add_argument("--gradient-accumulation", type=int, default=None,
                       help="micro-batches per optimizer step (default: 2 x stages - 1 on "
                       "pipelined IPUs, as PopTorch requires since SDK 2.4; 1 elsewhere)")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--device", choices=["auto", "ipu", "cuda", "cpu"], default="auto",
                       help="auto: ipu if PopTorch imports, else cuda if available, else cpu")
    train.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA/CPU)")
    train.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto",
                       help="bfloat16 autocast (auto: on CUDA only)")
    train.add_argument("--log-every", type=int, default=10,
                       help="steps between loss readings (progress bar, loss curve)")
    train.add_argument("--on-nan", choices=["stop", "skip"], default="stop",
                       help="on a non-finite loss: stop (after saving), or skip that step")

    ipu = p.add_argument_group("IPU and pipeline")
    ipu.add_argument("--ipus", "--stages", dest="stages", type=int, default=4,
                     help="pipeline stages: IPUs on IPU, ranks per pipeline under torchrun")
    ipu.add_argument("--device-iterations", type=int, default=8,
                     help="IPU: steps run on the device per call from the host; "
                     "torchrun pipeline: micro-batches per eval batch")
    ipu.add_argument("--schedule", choices=["gpipe", "1f1b"], default="1f1b",
                     help="torchrun pipeline schedule")

    out = p.add_argument_group("results and checkpoints")
    out.add_argument("--output-dir", default=None, help="default: runs/<timestamp>")
    out.add_argument("--save-every", type=int, default=None,
                     help="also checkpoint every N optimizer steps (always at each epoch end)")
    out.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    out.add_argument("--resume", default=None,
                     help="an output directory to continue, or 'auto' for the newest in runs/")

    pred = p.add_argument_group("prediction (no training)")
    pred.add_argument("--predict", metavar="MODEL_DIR", default=None,
                      help="classify TEXTS (or --predict-file) with a fine-tuned model")
    pred.add_argument("--predict-file", default=None, help="one text per line")
    pred.add_argument("texts", nargs="*", help="texts to classify with --predict")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        # Continue with the arguments the run was started with; anything given
        # again on this command line wins.
        args.resume = resolve_resume_dir(args.resume)
        saved = json.loads((args.resume / "args.json").read_text())
        parser.set_defaults(**{k: v for k, v in saved.items() if k not in ("resume", "texts")})
        resumed = parser.parse_args(argv)
        if resumed.model != saved["model"]:
            raise FinetuneError(f"{args.resume} was trained from --model {saved['model']}, "
                                f"not {resumed.model}: resume it without --model")
        resumed.resume, resumed.output_dir = args.resume, str(args.resume)
        args = resumed
    for name in ("epochs", "batch_size", "max_length", "stages", "device_iterations", "keep"):
        if getattr(args, name) < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be at least 1")
    return args


# ----------------------------------------------------------------------------
# 2. Device: the IPU flow where PopTorch is importable, else CUDA, else CPU.
# ----------------------------------------------------------------------------

def pick_device(requested):
    if requested == "ipu" and poptorch is None:
        raise FinetuneError("--device ipu needs PopTorch, which comes with Graphcore's Poplar "
                            "SDK (enable the SDK and install its poptorch wheel)")
    if requested == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("--device cuda: no CUDA device is visible to PyTorch")
    if requested == "auto":
        requested = ("ipu" if poptorch is not None else
                     "cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank)
    return requested if requested == "ipu" else torch.device("cpu")


def adamw(params, lr, device):
    """torch's AdamW, with the fused kernel where this torch has it.

    The fused kernel updates all weights in one pass: on CPU it takes a fifth of
    the time of the default (foreach) one, for the same update. CPU has it since
    torch 2.4; the IPU host's torch 2.0.1 has it on CUDA only.
    """
    fused = device.type == "cuda" or torch.__version__ >= "2.4"
    return torch.optim.AdamW(params, lr=lr, fused=fused or None)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------
# 3. Datasets: IMDB from the hub (the tutorial), or the same data from disk.
# ----------------------------------------------------------------------------

DATA_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
OFFLINE_HINT = ("no network? pass a local copy with --model PATH (a save_pretrained dir) "
                "and --dataset PATH (save_to_disk dir, parquet/csv/json files, or aclImdb)")


def first_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def read_aclimdb(root):
    """The original Stanford release: <split>/{neg,pos}/<id>_<rating>.txt."""
    splits = {}
    for split in ("train", "test"):
        texts, labels = [], []
        for label, name in enumerate(("neg", "pos")):
            for f in sorted((root / split / name).glob("*.txt")):
                texts.append(f.read_text(encoding="utf-8"))
                labels.append(label)
        splits[split] = Dataset.from_dict(
            {"text": texts, "label": labels},
            features=datasets.Features({"text": datasets.Value("string"),
                                        "label": ClassLabel(names=["neg", "pos"])}))
    return DatasetDict(splits)


def read_data_files(root):
    """A directory of files whose names start with their split: train.parquet, test-0.csv ..."""
    files = sorted(f for f in root.iterdir() if f.suffix in DATA_SUFFIXES)
    by_split = {split: [str(f) for f in files if f.name.startswith(split)]
                for split in ("train", "validation", "test")}
    by_split = {split: fs for split, fs in by_split.items() if fs}
    if not by_split:
        raise FinetuneError(f"{root} holds no train/test .parquet/.csv/.json(l) files "
                            "(names must start with the split, e.g. train.parquet)")
    kinds = {DATA_SUFFIXES[Path(f).suffix] for fs in by_split.values() for f in fs}
    if len(kinds) > 1:
        raise FinetuneError(f"{root} mixes file kinds {sorted(kinds)}: keep one")
    empty = [f for fs in by_split.values() for f in fs if os.path.getsize(f) == 0]
    if empty:
        raise FinetuneError(f"{empty[0]} is empty")
    kind, splits = kinds.pop(), {}
    for split, files in by_split.items():
        try:
            splits[split] = load_dataset(kind, data_files=files, split="train")
        except Exception as exc:  # datasets wraps the reader's error: show the reader's
            while exc.__cause__ or exc.__context__:
                exc = exc.__cause__ or exc.__context__
            if "corresponds to no data" in str(exc):
                raise FinetuneError(f"the {split} split is empty ({', '.join(files)})") from None
            raise FinetuneError(f"could not read the {split} files in {root} "
                                f"({first_line(exc)})") from None
    return DatasetDict(splits)


def looks_like_path(name):
    """Hub names are 'name' or 'owner/name'; anything else is meant as a local path."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1
            or Path(name).suffix in DATA_SUFFIXES)


def load_raw_splits(name):
    path = Path(name).expanduser()
    if not path.exists() and looks_like_path(name):
        raise FinetuneError(f"--dataset {name}: no such file or directory")
    if not path.exists():
        try:
            return load_dataset(name)
        except Exception as exc:  # the hub client raises many kinds; all mean "not loaded"
            raise FinetuneError(f"could not load dataset '{name}' from the Hugging Face Hub "
                                f"({first_line(exc)}); {OFFLINE_HINT}") from None
    if not path.is_dir():
        raise FinetuneError(f"--dataset {path}: give the directory holding the split files")
    if (path / "train" / "pos").is_dir():
        return read_aclimdb(path)
    if (path / "dataset_dict.json").exists():
        return load_from_disk(str(path))
    return read_data_files(path)


def select_splits(raw, text_column, label_column):
    """Train on 'train', validate on 'test' (as the tutorial); check what users get wrong."""
    if "train" not in raw:
        raise FinetuneError(f"the dataset has no 'train' split (splits: {', '.join(raw)})")
    eval_split = "test" if "test" in raw else "validation" if "validation" in raw else None
    if eval_split is None:
        raise FinetuneError("the dataset has no 'test' or 'validation' split "
                            f"(splits: {', '.join(raw)})")
    splits = {"train": raw["train"], "eval": raw[eval_split]}
    for split, ds in splits.items():
        missing = [c for c in (text_column, label_column) if c not in ds.column_names]
        if missing:
            raise FinetuneError(f"column {missing[0]!r} not in the {split} split; its columns are: "
                                f"{', '.join(ds.column_names)} (use --text-column/--label-column)")
        if len(ds) == 0:
            raise FinetuneError(f"the {split} split is empty")
        if ds.data.column(text_column).null_count or ds.data.column(label_column).null_count:
            raise FinetuneError(f"the {split} split has empty (null) values in "
                                f"{text_column!r} or {label_column!r}")
    return splits


def encode_labels(splits, label_column, label_names=None):
    """Labels become ids 0..n-1; string labels are mapped in sorted order."""
    feature = splits["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        names = feature.names
    else:
        values = sorted(set().union(*(ds.unique(label_column) for ds in splits.values())))
        if all(isinstance(v, str) for v in values):
            names = values
        elif all(isinstance(v, int) and v >= 0 for v in values):
            names = [str(i) for i in range(max(values) + 1)]
        else:
            raise FinetuneError(f"labels must be strings or integers >= 0, found {values[:5]}")
    if label_names:
        given = label_names.split(",")
        if len(given) != len(names):
            raise FinetuneError(f"--label-names has {len(given)} names, "
                                f"the data has {len(names)} labels")
        names = given
    if len(names) < 2:
        raise FinetuneError(f"the data has a single label ({names[0]}): need at least 2 classes")
    class_label = ClassLabel(names=names)
    for split, ds in splits.items():
        if ds.features[label_column] != class_label:
            if not isinstance(ds.features[label_column], ClassLabel) and label_names:
                ds = ds.cast_column(label_column, datasets.Value("int64"))
            splits[split] = ds.cast_column(label_column, class_label)
    return names


def subset(ds, n, seed):
    """A seeded random subset, so quick runs see a fair mix of labels."""
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def tokenize_batch(batch, tokenizer, text_column, max_length, padding):
    encoded = tokenizer(batch[text_column], truncation=True, max_length=max_length,
                        padding=padding, return_token_type_ids=False)
    encoded["length"] = [sum(mask) for mask in encoded["attention_mask"]]
    return encoded


def tokenize(ds, tokenizer, args, padding):
    """Tokenize in batches; datasets caches the result, so a second run reads it back.

    Only input_ids, attention_mask and labels are kept: for single texts the
    token type ids are all zero, which is the models' default.
    """
    ds = ds.map(tokenize_batch, batched=True, desc="Tokenizing",
                remove_columns=[c for c in ds.column_names if c != args.label_column],
                fn_kwargs=dict(tokenizer=tokenizer, text_column=args.text_column,
                               max_length=args.max_length, padding=padding))
    if args.label_column != "labels":
        ds = ds.rename_column(args.label_column, "labels")
    ds.set_format("torch", columns=["input_ids", "attention_mask", "labels"])
    return ds, ds.with_format("numpy", columns=["length"])["length"][:].tolist()


# ----------------------------------------------------------------------------
# 4. Batches: shuffled, optionally grouped by length, padded per batch.
# ----------------------------------------------------------------------------

def train_batches(lengths, batch_size, seed, epoch, group_by_length):
    """The epoch's batches as lists of sample indices (shuffle, drop_last).

    Grouping by length sorts each shuffled window of 50 batches by length, cuts
    it into batches and shuffles the batches: every sample is still seen once
    per epoch in a random batch order, but a batch holds texts of similar
    length, so dynamic padding wastes almost nothing (as HF's group_by_length).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    usable = len(order) - len(order) % batch_size
    if group_by_length:
        window = 50 * batch_size
        order = np.concatenate([
            sorted(order[i:i + window], key=lambda j: -lengths[j])
            for i in range(0, len(order), window)])
    batches = [order[i:i + batch_size].tolist() for i in range(0, usable, batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def eval_batches(lengths, batch_size):
    """Every sample once, longest first: similar lengths share a batch."""
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_collate(pad_id):
    def collate(rows):
        return {
            "input_ids": torch.nn.utils.rnn.pad_sequence(
                [r["input_ids"] for r in rows], batch_first=True, padding_value=pad_id),
            "attention_mask": torch.nn.utils.rnn.pad_sequence(
                [r["attention_mask"] for r in rows], batch_first=True, padding_value=0),
            "labels": torch.stack([r["labels"] for r in rows]),
        }
    return collate


def torch_loader(ds, batches, pad_id):
    # Its own generator: starting an epoch must not draw from the global RNG that
    # dropout uses, or a resumed run would not replay the same dropout masks.
    return torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=pad_collate(pad_id),
                                       generator=torch.Generator())


# ----------------------------------------------------------------------------
# 5. Model: a pretrained encoder with a fresh classification head.
# ----------------------------------------------------------------------------

def load_model(name, label_names):
    path_given = Path(name).expanduser().exists()
    if not path_given and looks_like_path(name):
        raise FinetuneError(f"--model {name}: no such directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            ignore_mismatched_sizes=True)  # a head fine-tuned for other labels starts afresh
    except OSError as exc:
        where = f"directory {name}" if path_given else f"'{name}' from the Hugging Face Hub"
        hint = "" if path_given else f"; {OFFLINE_HINT}"
        raise FinetuneError(f"could not load model {where} ({first_line(exc)}){hint}") from None
    return model, tokenizer


# ----------------------------------------------------------------------------
# 6. Pipeline stage plan: which module runs on which stage.
#
# The tutorial splits ELECTRA over 4 IPUs: embeddings on IPU 0, the 12 encoder
# layers 4 per IPU on IPUs 1-3, the classifier on IPU 3. Stage 0 holds only the
# embeddings because their large vocabulary table fills much of an IPU's memory.
# The plan is computed from the model, so other depths and stage counts work,
# and the torchrun pipeline uses the very same plan.
# ----------------------------------------------------------------------------

def layer_stages(num_layers, stages):
    """Stage of each encoder layer: spread evenly over stages 1..stages-1."""
    if stages == 1:
        return [0] * num_layers
    if stages - 1 > num_layers:
        raise FinetuneError(f"{stages} stages need at least {stages - 1} encoder layers "
                            f"(one stage is the embeddings); this model has {num_layers}: "
                            f"use --ipus {num_layers + 1} or fewer")
    return [1 + i * (stages - 1) // num_layers for i in range(num_layers)]


def plan_stages(model, stages):
    """[(module name, stage)] in forward order, for any BERT-family classifier."""
    base_name, base = model.base_model_prefix, model.base_model
    encoder = None  # (its name, the name of its layer list, the layers)
    for child_name, child in base.named_children():
        lists = [(n, m) for n, m in child.named_children() if isinstance(m, torch.nn.ModuleList)]
        if lists:
            encoder = (child_name, *lists[0])
            break
    if encoder is None:
        raise FinetuneError(f"cannot find the encoder layers of {type(model).__name__}")
    encoder_name, layers_name, layers = encoder
    layers_path = f"{base_name}.{encoder_name}.{layers_name}"
    plan, stage_of_layer = [], layer_stages(len(layers), stages)
    seen_encoder = False
    for child_name, _ in base.named_children():
        if child_name == encoder_name:
            seen_encoder = True
            plan += [(f"{layers_path}.{i}", s) for i, s in enumerate(stage_of_layer)]
        else:  # embeddings (and their projection) before the encoder, pooler after
            plan.append((f"{base_name}.{child_name}", stages - 1 if seen_encoder else 0))
    plan += [(name, stages - 1) for name, module in model.named_children()  # the head
             if name != base_name and any(True for _ in module.parameters())]
    return plan


def stage_table(model, plan):
    rows = []
    for stage in sorted({s for _, s in plan}):
        names = [n for n, s in plan if s == stage]
        params = sum(p.numel() for n in names for p in model.get_submodule(n).parameters())
        rows.append((stage, compact_names(names), params))
    width = max(len(r[1]) for r in rows)
    lines = [f"{'stage':>5}  {'modules':<{width}}  {'parameters':>10}"]
    lines += [f"{s:>5}  {m:<{width}}  {p:>10,}" for s, m, p in rows]
    return "\n".join(lines)


def compact_names(names):
    """'a.layer.0', 'a.layer.1', 'a.layer.2' -> 'a.layer.0-2'."""
    out, run = [], []
    for name in names + [None]:
        prefix, _, last = name.rpartition(".") if name else ("", "", "")
        if run and (not last.isdigit() or prefix != run[0][0] or int(last) != run[-1][1] + 1):
            out.append(f"{run[0][0]}.{run[0][1]}" + (f"-{run[-1][1]}" if len(run) > 1 else ""))
            run = []
        if name is None:
            break
        if last.isdigit():
            run.append((prefix, int(last)))
        else:
            out.append(name)
    return ", ".join(out)


# ----------------------------------------------------------------------------
# 7. The IPU models (PopTorch).
# ----------------------------------------------------------------------------

class IPUWrapper(torch.nn.Module):
    """PopTorch needs to know which output is the loss it should minimise.

    In training the loss is wrapped in `poptorch.identity_loss` (reduction
    "none": the model already averaged it); the inference model returns it as
    a plain output. Positional inputs keep the traced graph's order explicit.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        loss = poptorch.identity_loss(out.loss, reduction="none") if self.training else out.loss
        return loss, out.logits


def set_output_all(opts):
    """Return every sample's output, not just the last micro-batch's.

    The tutorial's `anchorMode(All)` was renamed `outputMode` in SDK 2.4 and
    the old name removed in 2.5: use whichever this SDK has.
    """
    if hasattr(opts, "outputMode"):
        return opts.outputMode(poptorch.OutputMode.All)
    return opts.anchorMode(poptorch.AnchorMode.All)


def ipu_options(args, accumulation, training):
    # Device iterations: the IPU runs this many steps per call from the host,
    # so one host batch carries batch_size x deviceIterations samples (x the
    # gradient accumulation in training) and the host is out of the loop.
    opts = poptorch.Options().deviceIterations(args.device_iterations)
    if training:
        # Pipelined training needs at least 2 x stages - 1 micro-batches per
        # optimizer step to fill and drain the forward and backward stages
        # (checked since SDK 2.4; the tutorial predates that check).
        opts.Training.gradientAccumulation(accumulation)
    else:
        set_output_all(opts)
    return opts


def place_on_ipus(model, plan):
    """poptorch.BeginBlock starts a new pipeline stage at each planned module."""
    for name, stage in plan:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, poptorch.BeginBlock(getattr(parent, attr), name, ipu_id=stage))


def padded_indices(n, multiple):
    """All n indices, padded with repeats of sample 0 to a whole number of host batches."""
    return list(range(n)) + [0] * (-n % multiple)


def ipu_models(model, args, accumulation, train_ds, eval_ds):
    """The tutorial's flow: build, compile each model on one batch, detach both.

    A training and an inference model cannot hold the same IPUs at once, so
    each epoch attaches one, runs it, and detaches it before the other.
    """
    train_opts = ipu_options(args, accumulation, training=True)
    eval_opts = ipu_options(args, accumulation, training=False)
    train_loader = poptorch.DataLoader(train_opts, train_ds, batch_size=args.batch_size,
                                       shuffle=True, drop_last=True)
    # A static graph cannot take a short last batch: pad the eval set to whole
    # host batches and ignore the padding's predictions.
    host_batch = args.batch_size * args.device_iterations
    eval_loader = poptorch.DataLoader(
        eval_opts, torch.utils.data.Subset(eval_ds, padded_indices(len(eval_ds), host_batch)),
        batch_size=args.batch_size, shuffle=False, drop_last=True)

    wrapped = IPUWrapper(model)
    optimizer = poptorch.optim.AdamW(wrapped.parameters(), lr=args.lr)
    training_model = poptorch.trainingModel(wrapped, options=train_opts, optimizer=optimizer)
    inference_model = poptorch.inferenceModel(wrapped, options=eval_opts)
    for ipu_model, loader, training in ((training_model, train_loader, True),
                                        (inference_model, eval_loader, False)):
        wrapped.train(training)  # each graph is traced in its own mode (dropout, identity_loss)
        batch = next(iter(loader))
        ipu_model.compile(batch["input_ids"], batch["attention_mask"], batch["labels"])
        ipu_model.detachFromDevice()
    return training_model, inference_model, optimizer, train_loader, eval_loader


# ----------------------------------------------------------------------------
# 8. More devices with torchrun: pipeline stages and replicas on GPUs or CPUs.
#
# Under `torchrun --nproc-per-node N finetune_electra.py --stages S` every
# process is one rank, switched on by torchrun's environment as in nanoGPT.
# The N ranks form N / S replicas of an S-stage pipeline (rank = replica x S +
# stage), as PopTorch replicates a pipelined model. The tutorial's IPU ideas map
# onto torch.distributed like this:
#   BeginBlock(module, ipu_id=s)       SplitPoint.BEGINNING at stage s's first module
#   Training.gradientAccumulation(M)   the schedule's M micro-batches per optimizer step
#   deviceIterations(D), anchorMode    eval batches of D micro-batches; every rank's
#     (All)                            predictions gathered, as anchorMode All returns all
#   replicationFactor(R)               R replicas (DDP, or gradients all-reduced per stage)
# With S = 1 this is plain DistributedDataParallel.
# ----------------------------------------------------------------------------

class Ranks:
    """Where this process sits: its rank, pipeline stage and replica."""

    def __init__(self, rank=0, world=1, stages=1):
        self.enabled = world > 1 or "RANK" in os.environ
        self.rank, self.world, self.stages = rank, world, stages
        self.replicas = world // stages
        self.stage, self.replica = rank % stages, rank // stages
        self.is_main = rank == 0
        self.pp_group = self.dp_group = None
        self.device = torch.device("cpu")  # where collectives' tensors live


def has_pipelining():
    """torch.distributed.pipelining came with torch 2.4; the IPU host's torch 2.0.1 lacks it."""
    try:
        import torch.distributed.pipelining  # noqa: F401
    except ImportError:
        return False
    return True


def setup_distributed(args, device):
    if "RANK" not in os.environ:
        return Ranks()
    world = int(os.environ["WORLD_SIZE"])
    if device == "ipu":
        raise FinetuneError("torchrun is for CUDA and CPU; on IPUs, PopTorch replicates the model")
    if world % args.stages:
        raise FinetuneError(f"{world} processes cannot hold whole {args.stages}-stage pipelines: "
                            f"use --stages 1 (data parallel only) or a divisor of {world}")
    if args.stages > 1 and not has_pipelining():
        raise FinetuneError(f"torchrun with --stages {args.stages} needs torch.distributed."
                            f"pipelining, in torch 2.4 or newer (this is torch {torch.__version__}): "
                            "use --stages 1 (data parallel) or a newer torch")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ranks = Ranks(dist.get_rank(), world, args.stages)
    ranks.device = device
    for replica in range(ranks.replicas):  # every rank creates every group, in order
        group = dist.new_group(list(range(replica * args.stages, (replica + 1) * args.stages)))
        ranks.pp_group = group if replica == ranks.replica else ranks.pp_group
    for stage in range(args.stages):
        group = dist.new_group(list(range(stage, world, args.stages)))
        ranks.dp_group = group if stage == ranks.stage else ranks.dp_group
    return ranks


def mean_over_replicas(value, ranks):
    """A loss as the whole optimizer step saw it: averaged over the replicas."""
    if ranks.replicas > 1:
        value = value.clone()
        dist.all_reduce(value, group=ranks.dp_group)
        value /= ranks.replicas
    return value


@contextlib.contextmanager
def main_process_first(ranks):
    """Rank 0 tokenizes first and fills the datasets cache; the others read it."""
    if ranks.enabled and not ranks.is_main:
        dist.barrier()
    yield
    if ranks.enabled and ranks.is_main:
        dist.barrier()


class LogitsOnly(torch.nn.Module):
    """What the pipeline traces: token ids and mask in, logits out (the schedule owns the loss)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def trace_pipeline(wrapped, plan, example):
    from torch.distributed.pipelining import SplitPoint, pipeline
    first_of_stage = {}
    for name, stage in plan:
        first_of_stage.setdefault(stage, f"model.{name}")
    split_spec = {name: SplitPoint.BEGINNING for stage, name in first_of_stage.items() if stage}
    pipe = pipeline(wrapped, mb_args=example, split_spec=split_spec)
    for name in split_spec:  # pipeline() wrapped these forwards in place: undo it for a next trace
        module = wrapped.get_submodule(name)
        del module.forward, module._orig_forward
    return pipe


def pipeline_steps(model, plan, args, ranks, device, accumulation):
    """This rank's stage of the model, trained and evaluated by pipeline schedules.

    The model is traced with static shapes (one micro-batch of --max-length
    tokens), like an IPU graph, and once per mode: dropout is part of the trace.
    Both traces share the model's weights.
    """
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe
    wrapped = LogitsOnly(model)
    example = (torch.zeros(args.batch_size, args.max_length, dtype=torch.long),
               torch.ones(args.batch_size, args.max_length, dtype=torch.long))
    stages = {}
    for training in (True, False):
        wrapped.train(training)
        pipe = trace_pipeline(wrapped, plan, example)
        stages[training] = pipe.build_stage(ranks.stage, device, group=ranks.pp_group)
    stage_module = stages[True].submod
    optimizer = adamw(stage_module.parameters(), args.lr, device)
    # The loss is averaged per micro-batch and the schedule divides the summed
    # gradients by the micro-batch count: one mean over the step's samples.
    schedule = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[args.schedule](
        stages[True], n_microbatches=accumulation, loss_fn=torch.nn.functional.cross_entropy)
    eval_schedule = ScheduleGPipe(stages[False], n_microbatches=args.device_iterations)
    first, last = ranks.stage == 0, ranks.stage == ranks.stages - 1

    def inputs(batch):
        return (batch["input_ids"].to(device), batch["attention_mask"].to(device)) if first else ()

    def train_step(batch):
        losses = []
        schedule.step(*inputs(batch), target=batch["labels"].to(device) if last else None,
                      losses=losses)
        # Only last stages know the loss: every rank gets the mean over replicas.
        loss = torch.stack(losses).mean().detach() if last else torch.zeros((), device=device)
        dist.all_reduce(loss)
        loss /= ranks.replicas
        if not torch.isfinite(loss):  # before the update: the weights stay good
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(loss.item())
        if ranks.replicas > 1:
            for param in stage_module.parameters():
                if param.grad is not None:
                    dist.all_reduce(param.grad, group=ranks.dp_group)
                    param.grad /= ranks.replicas
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    @torch.no_grad()
    def eval_step(batch):
        logits = eval_schedule.step(*inputs(batch))
        return logits if last else None

    return train_step, eval_step, optimizer, stage_module


def gather_pipeline_weights(model, stage_module, ranks):
    """Each stage trained its own weights: bring them all into rank 0's model."""
    def model_name(name):  # without LogitsOnly's "model." (str.removeprefix is Python 3.9+)
        return name[len("model."):] if name.startswith("model.") else name

    mine = {} if ranks.replica else {model_name(name): value.detach().cpu()
                                     for name, value in stage_module.state_dict().items()}
    everyone = [None] * ranks.world
    dist.all_gather_object(everyone, mine)
    weights = {name: value for part in everyone for name, value in part.items()}
    missing = [name for name, _ in model.named_parameters() if name not in weights]
    if missing:
        raise RuntimeError(f"no pipeline stage holds {missing[:3]}")
    model.load_state_dict(weights, strict=False)


# ----------------------------------------------------------------------------
# 9. Training and validation: one loop for every device.
#
# A "step" function hides what differs: on IPU the training model runs the
# forward, backward and optimizer step itself on a whole host batch; on CUDA
# or CPU we call them. The loop, the progress bar and the metrics are shared.
# ----------------------------------------------------------------------------

class NonFiniteLoss(Exception):
    pass


def torch_steps(model, eval_model, optimizer, device, accumulation, autocast_dtype, ranks):
    autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype \
        else contextlib.nullcontext

    def train_step(batch):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        model.train()
        total = 0.0
        # Gradient accumulation: the step's batch is cut into micro-batches whose
        # gradients add up before one optimizer step, as on the IPU. Under DDP the
        # gradients are averaged over the replicas once, with the last micro-batch.
        micro_batches = list(zip(*(v.chunk(accumulation) for v in batch.values())))
        for i, micro in enumerate(micro_batches):
            no_sync = getattr(model, "no_sync", None) if i < len(micro_batches) - 1 else None
            with no_sync() if no_sync else contextlib.nullcontext():
                with autocast():
                    loss = model(**dict(zip(batch, micro))).loss / accumulation
                seen = mean_over_replicas(loss.detach(), ranks)
                if not torch.isfinite(seen):  # before the update: the weights stay good
                    optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteLoss(seen.item())
                loss.backward()
            total += seen
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    @torch.inference_mode()
    def eval_step(batch):
        eval_model.eval()
        with autocast():
            return eval_model(input_ids=batch["input_ids"].to(device),
                              attention_mask=batch["attention_mask"].to(device)).logits.float()

    return train_step, eval_step


def ipu_steps(training_model, inference_model):
    def train_step(batch):
        loss, _ = training_model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        if not torch.isfinite(loss).all():  # the device has already applied this step
            raise NonFiniteLoss(float(loss.reshape(-1)[-1]))
        return loss.mean()

    def eval_step(batch):
        _, logits = inference_model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        return logits

    return train_step, eval_step


def evaluate(eval_step, loader, order, labels, bar, ranks):
    """Accuracy over every eval sample; `order` says which sample each row is.

    Every rank predicts its share of the batches; all predictions are gathered
    (the analog of anchorMode All) and each sample must be predicted at least
    once: repeats, from padding to whole batches, are the same sample's.
    """
    start, batch_predictions = time.perf_counter(), []
    for batch in loader:
        logits = eval_step(batch)
        if logits is not None:  # None: a pipeline stage before the last
            batch_predictions.append(logits.argmax(-1).cpu())
        bar.update(1)
    mine = [(order, torch.cat(batch_predictions).numpy())] if batch_predictions else []
    if ranks.enabled:
        everyone = [None] * ranks.world
        dist.all_gather_object(everyone, mine)
        mine = [part for parts in everyone for part in parts]
    predictions = np.full(len(labels), -1, dtype=np.int64)
    for indices, predicted in mine:
        predictions[np.asarray(indices)] = predicted
    if (predictions < 0).any():
        raise RuntimeError(f"{(predictions < 0).sum()} eval samples got no prediction")
    seconds = time.perf_counter() - start
    return accuracy_score(labels, predictions), len(labels) / seconds


class StopRequest:
    """Ctrl-C or SIGTERM: finish the current step, save, and exit cleanly.

    A second Ctrl-C interrupts at once.
    """

    def __init__(self):
        self.signal = None
        self.previous = {sig: signal.signal(sig, self.handle)
                         for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def requested(self, ranks):
        """Whether to stop now; under torchrun all ranks agree, so they stop at one step."""
        if not ranks.enabled:
            return self.signal is not None
        flag = torch.tensor([self.signal is not None], dtype=torch.int32, device=ranks.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)


# ----------------------------------------------------------------------------
# 10. Checkpoints: atomic, safetensors + JSON, never a pickle.
#
# Each checkpoint is written into a hidden temporary directory, flushed to
# disk, and renamed into place: a kill mid-write leaves the previous one whole.
# ----------------------------------------------------------------------------

def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state():
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    np_state = np.random.get_state()
    return tensors, {"python": random.getstate(),
                     "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def set_rng_state(tensors, saved):
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = saved["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))


def checkpoint_name(state):
    """step-N mid-epoch, step-N-end after an epoch: names sort in the order they were taken."""
    return f"step-{state['global_step']:08d}" + ("" if state["step"] else "-end")


def save_checkpoint(out_dir, model, optimizer, state, keep):
    root = out_dir / "checkpoints"
    final = root / checkpoint_name(state)
    if final.exists():  # this very state is saved already (Ctrl-C right after a checkpoint)
        return final
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    opt_state = optimizer.state_dict()
    opt_tensors, opt_json = {}, {"param_groups": opt_state["param_groups"], "state": {}}
    for pid, values in opt_state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                opt_tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                opt_json["state"].setdefault(str(pid), {})[key] = value
    rng_tensors, rng_json = rng_state()
    save_file({k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
              tmp / "model.safetensors")
    save_file({**opt_tensors, **rng_tensors}, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "optimizer": opt_json, "rng": rng_json}))
    for f in tmp.iterdir():
        fsync_path(f)
    fsync_path(tmp)
    os.rename(tmp, final)
    fsync_path(root)
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(out_dir):
    """Complete checkpoints, oldest first (temporary directories are hidden)."""
    root = Path(out_dir) / "checkpoints"
    return sorted(root.glob("step-*")) if root.is_dir() else []


def load_checkpoint(out_dir, model, optimizer):
    """Restore the newest checkpoint into model and optimizer; return the run state."""
    checkpoints = list_checkpoints(out_dir)
    if not checkpoints:
        raise FinetuneError(f"no checkpoint in {out_dir}/checkpoints: nothing to resume")
    path = checkpoints[-1]
    weights = load_file(path / "model.safetensors")
    expected = model.state_dict()
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in weights):
        raise FinetuneError(f"{path} was saved from another model architecture than --model")
    model.load_state_dict(weights)
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(path / "optimizer.safetensors")
    opt_json = state.pop("optimizer")
    opt_state = {"param_groups": opt_json["param_groups"], "state": {}}
    for key, value in tensors.items():
        if not key.startswith("rng."):
            pid, name = key.split(".", 1)
            opt_state["state"].setdefault(int(pid), {})[name] = value
    for pid, values in opt_json["state"].items():
        opt_state["state"].setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict(opt_state)
    set_rng_state(tensors, state.pop("rng"))
    return state, path


def resolve_resume_dir(value):
    if value == "auto":
        runs = sorted((d for d in Path("runs").glob("*") if list_checkpoints(d)),
                      key=lambda d: list_checkpoints(d)[-1].stat().st_mtime)
        if not runs:
            raise FinetuneError("--resume auto: no run with a checkpoint under runs/")
        value = runs[-1]
    path = Path(value)
    if not (path / "args.json").is_file() or not list_checkpoints(path):
        raise FinetuneError(f"--resume {path}: no checkpoint there (expected args.json "
                            "and checkpoints/step-*)")
    return path


# ----------------------------------------------------------------------------
# 11. Results: metrics per epoch, the loss/accuracy plot, the final model.
# ----------------------------------------------------------------------------

def write_results(out_dir, state):
    with open(out_dir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in state["metrics"])
    (out_dir / "loss_curve.json").write_text(json.dumps(state["loss_curve"]))
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    if state["loss_curve"]:
        steps, losses = zip(*state["loss_curve"])
        loss_ax.plot(steps, losses)
    loss_ax.set(xlabel="optimizer step", ylabel="train loss", title="Training loss")
    epochs = [m["epoch"] for m in state["metrics"]]
    acc_ax.plot(epochs, [m["accuracy"] for m in state["metrics"]], marker="o")
    acc_ax.set_xticks(epochs)
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Validation accuracy")
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png")
    plt.close(fig)


# ----------------------------------------------------------------------------
# 12. Prediction with a fine-tuned model.
# ----------------------------------------------------------------------------

@torch.inference_mode()
def predict(model_dir, texts, max_length=512, batch_size=32):
    if not (Path(model_dir) / "config.json").is_file():
        raise FinetuneError(f"--predict {model_dir}: not a saved model (no config.json); "
                            "use <output-dir>/model from a training run")
    if not texts:
        raise FinetuneError("--predict: give texts to classify, or --predict-file")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    results = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt")
        probs = model(**enc).logits.softmax(-1)
        best = probs.max(-1)
        results += [(model.config.id2label[int(i)], float(p))
                    for p, i in zip(best.values, best.indices)]
    return results


def read_lines(path):
    try:
        texts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except OSError as exc:
        raise FinetuneError(f"--predict-file {path}: {exc.strerror}") from None
    return [t for t in texts if t]


# ----------------------------------------------------------------------------
# 13. main(): the tutorial's steps in order.
# ----------------------------------------------------------------------------

class Interrupted(Exception):
    pass


def prepare_output_dir(args):
    out_dir = Path(args.output_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        saved = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        (out_dir / "args.json").write_text(json.dumps(saved, indent=2))
    except OSError as exc:
        raise FinetuneError(f"cannot write to the output directory {out_dir}: "
                            f"{exc.strerror}") from None
    return out_dir


def new_state():
    return {"epoch": 0, "step": 0, "global_step": 0, "batches": None,
            "loss_sum": 0.0, "loss_steps": 0, "interval_sum": 0.0, "interval_steps": 0,
            "train_samples": 0, "train_seconds": 0.0, "skipped_steps": 0,
            "metrics": [], "loss_curve": []}


def train_epoch(train_step, loader, state, args, bar, checkpoint, stop, ranks):
    """One pass over the training batches; `state` is what a checkpoint needs to continue.

    `checkpoint` is None where the host has no current weights mid-epoch (IPU:
    they come back on detach) or no single copy of them (a torchrun pipeline).
    """
    last = time.perf_counter()
    for batch in loader:
        where = f"epoch {state['epoch'] + 1}, step {state['step'] + 1}"
        try:
            loss = float(train_step(batch))
        except NonFiniteLoss as bad:
            if args.on_nan == "stop" or args.device == "ipu":  # an IPU has already applied it
                saved = f"; kept the last good weights in {checkpoint()}" if checkpoint else ""
                raise FinetuneError(f"the loss became {bad} at {where}{saved}. "
                                    "Lower --lr, or pass --on-nan skip") from None
            if ranks.is_main:
                tqdm.write(f"warning: loss {bad} at {where}: step skipped")
            state["skipped_steps"] += 1
            loss = None
        now = time.perf_counter()  # the step and the loading of its batch
        state["train_seconds"] += now - last
        last = now
        state["train_samples"] += len(batch["labels"]) * ranks.replicas
        state["step"] += 1
        state["global_step"] += 1
        if loss is not None:
            state["loss_sum"] += loss
            state["loss_steps"] += 1
            state["interval_sum"] += loss
            state["interval_steps"] += 1
        if state["global_step"] % args.log_every == 0 and state["interval_steps"]:
            mean = state["interval_sum"] / state["interval_steps"]
            state["loss_curve"].append([state["global_step"], mean])
            state["interval_sum"], state["interval_steps"] = 0.0, 0
            bar.set_postfix(loss=f"{mean:.4f}",
                            samples_per_s=f"{state['train_samples'] / state['train_seconds']:.1f}")
        bar.update(1)
        if checkpoint and args.save_every and state["global_step"] % args.save_every == 0:
            checkpoint()
            last = time.perf_counter()
        if stop.requested(ranks):
            raise Interrupted(stop.signal or "another rank's signal")


def main(argv=None):
    args = parse_args(argv)
    if args.predict:
        texts = args.texts + (read_lines(args.predict_file) if args.predict_file else [])
        results = predict(args.predict, texts, args.max_length)
        for text, (label, prob) in zip(texts, results):
            print(f"{label}\t{prob:.3f}\t{text}")
        return results

    device = pick_device(args.device)
    on_ipu = device == "ipu"
    args.device = "ipu" if on_ipu else device.type
    ranks = setup_distributed(args, device)
    try:
        return finetune(args, device, ranks)
    finally:
        if ranks.enabled:
            dist.destroy_process_group()


def finetune(args, device, ranks):
    on_ipu, pipelined = args.device == "ipu", ranks.stages > 1
    say = print if ranks.is_main else lambda *_, **__: None
    if not ranks.is_main:  # one voice: rank 0 speaks for all
        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
    static = on_ipu or pipelined  # IPU graphs and traced pipelines have fixed shapes
    padding = args.padding if args.padding != "auto" else "max_length" if static else "dynamic"
    if static and padding == "dynamic":
        raise FinetuneError("--padding dynamic is for CUDA/CPU without pipeline stages: IPU "
                            "graphs and traced pipelines need static shapes")
    if on_ipu and args.device_iterations < args.stages:
        raise FinetuneError(f"--device-iterations {args.device_iterations} cannot fill a "
                            f"{args.stages}-stage pipeline: use at least {args.stages}")
    if pipelined and args.resume:
        raise FinetuneError("--resume works for single-process and data-parallel runs; "
                            "torchrun pipeline runs write no checkpoints")
    group_by_length = args.group_by_length == "yes" or (
        args.group_by_length == "auto" and padding == "dynamic")
    accumulation = args.gradient_accumulation or (
        2 * args.stages - 1 if (on_ipu or pipelined) and args.stages > 1 else 1)
    step_batch = args.batch_size * accumulation
    out_dir = prepare_output_dir(args) if ranks.is_main else None
    if ranks.enabled:  # every rank writes to rank 0's directory (its name has a timestamp)
        shared = [str(out_dir)]
        dist.broadcast_object_list(shared)
        out_dir = Path(shared[0])
    seed_everything(args.seed)

    # --- Data: load, check, label, subset, tokenize (only the splits we use).
    with main_process_first(ranks):
        splits = select_splits(load_raw_splits(args.dataset), args.text_column, args.label_column)
        label_names = encode_labels(splits, args.label_column, args.label_names)
        say("labels: " + ", ".join(f"{i}={name}" for i, name in enumerate(label_names)))
        model, tokenizer = load_model(args.model, label_names)
        tokenize_padding = "max_length" if padding == "max_length" else False
        train_ds, train_lengths = tokenize(subset(splits["train"], args.train_samples, args.seed),
                                           tokenizer, args, tokenize_padding)
        eval_ds, eval_lengths = tokenize(subset(splits["eval"], args.eval_samples, args.seed),
                                         tokenizer, args, tokenize_padding)
    if len(train_ds) < step_batch * ranks.replicas:
        raise FinetuneError(f"the train split has {len(train_ds)} samples, fewer than one "
                            f"optimizer step's batch ({step_batch * ranks.replicas})")
    eval_labels = eval_ds.with_format("numpy", columns=["labels"])["labels"][:]
    if ranks.enabled:  # same initial weights everywhere, but each rank its own dropout masks
        torch.manual_seed(args.seed + ranks.rank)

    # --- Model: where each part runs.
    plan = plan_stages(model, args.stages)
    used_by = ("applied with poptorch.BeginBlock" if on_ipu else
               f"one stage per rank, {ranks.replicas} replica(s)" if pipelined else
               "used on IPU or by torchrun with --stages > 1")
    say(f"pipeline stage plan ({args.stages} stages, {used_by})")
    say(stage_table(model, plan))

    stage_module = None
    if on_ipu:
        place_on_ipus(model, plan)
        training_model, inference_model, optimizer, train_loader, eval_loader = ipu_models(
            model, args, accumulation, train_ds, eval_ds)
        train_step, eval_step = ipu_steps(training_model, inference_model)
        eval_order = padded_indices(len(eval_ds), args.batch_size * args.device_iterations)
        steps_per_epoch = len(train_loader)
        host_batch = args.batch_size * args.device_iterations * accumulation
        say(f"IPU: host batch {args.batch_size} x {args.device_iterations} device iterations x "
            f"{accumulation} accumulated = {host_batch} samples; "
            f"{step_batch} samples per optimizer step")
    else:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if pipelined:
            train_step, eval_step, optimizer, stage_module = pipeline_steps(
                model, plan, args, ranks, device, accumulation)
            # Static shapes: eval batches of device-iterations micro-batches, the
            # last one padded with repeats (their predictions are the same).
            eval_batch_size = args.batch_size * args.device_iterations
            padded = padded_indices(len(eval_ds), eval_batch_size)
            eval_batch_list = [padded[i:i + eval_batch_size]
                               for i in range(0, len(padded), eval_batch_size)]
        else:
            model.to(device)
            train_model = model
            if ranks.enabled:
                train_model = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[device.index] if device.type == "cuda" else None)
            optimizer = adamw(model.parameters(), args.lr, device)
            bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and device.type == "cuda")
            train_step, eval_step = torch_steps(
                torch.compile(train_model) if args.compile else train_model, model, optimizer,
                device, accumulation, torch.bfloat16 if bf16 else None, ranks)
            eval_batch_list = eval_batches(eval_lengths, args.eval_batch_size or
                                           args.batch_size * args.device_iterations)
        my_eval_batches = eval_batch_list[ranks.replica::ranks.replicas]
        eval_order = [i for batch in my_eval_batches for i in batch]
        eval_loader = torch_loader(eval_ds, my_eval_batches, tokenizer.pad_token_id)
        steps_per_epoch = len(train_lengths) // (step_batch * ranks.replicas)
        if ranks.enabled:
            say(f"torchrun: {ranks.world} ranks = {ranks.replicas} replica(s) x {ranks.stages} "
                f"stage(s); {step_batch * ranks.replicas} samples per optimizer step")

    state = new_state()
    if args.resume:
        state, path = load_checkpoint(out_dir, model, optimizer)
        say(f"resumed from {path} (epoch {state['epoch'] + 1}, step {state['step']})")

    def save():
        if ranks.is_main:
            save_checkpoint(out_dir, model, optimizer, state, args.keep)
        if ranks.enabled:
            dist.barrier()
        return list_checkpoints(out_dir)[-1]

    mid_epoch_checkpoint = None if on_ipu or pipelined else save

    # --- Train and validate: one progress bar over every iteration, as the tutorial.
    iterations = steps_per_epoch + len(eval_loader)
    bar = tqdm(total=args.epochs * iterations, initial=state["epoch"] * iterations + state["step"],
               desc=f"{args.device} training", unit="it", disable=not ranks.is_main)
    stop = StopRequest()
    try:
        for epoch in range(state["epoch"], args.epochs):
            epoch_start = time.perf_counter()
            if on_ipu:
                training_model.attachToDevice()
                train_epoch(train_step, train_loader, state, args, bar, None, stop, ranks)
                training_model.detachFromDevice()  # copies the trained weights to the host
                inference_model.attachToDevice()
            else:
                if state["batches"] is None:  # every replica's batches, in the checkpoint
                    state["batches"] = train_batches(train_lengths, step_batch * ranks.replicas,
                                                     args.seed, epoch, group_by_length)
                share = slice(ranks.replica * step_batch, (ranks.replica + 1) * step_batch)
                loader = torch_loader(train_ds, [batch[share] for batch in
                                                 state["batches"][state["step"]:]],
                                      tokenizer.pad_token_id)
                train_epoch(train_step, loader, state, args, bar, mid_epoch_checkpoint, stop, ranks)
            accuracy, eval_rate = evaluate(eval_step, eval_loader, eval_order, eval_labels, bar,
                                           ranks)
            if on_ipu:
                inference_model.detachFromDevice()
            if ranks.is_main:
                tqdm.write(f"Accuracy: {accuracy:.3f}")
            state["metrics"].append({
                "epoch": epoch + 1,
                "train_loss": state["loss_sum"] / max(state["loss_steps"], 1),
                "accuracy": accuracy,
                "train_samples_per_s": state["train_samples"] / state["train_seconds"],
                "eval_samples_per_s": eval_rate,
                "seconds": time.perf_counter() - epoch_start,
                "skipped_steps": state["skipped_steps"],
            })
            state.update(epoch=epoch + 1, step=0, batches=None, loss_sum=0.0, loss_steps=0,
                         train_samples=0, train_seconds=0.0, skipped_steps=0)
            if ranks.is_main:
                write_results(out_dir, state)
            if not pipelined:
                save()
    except Interrupted as why:
        path = save() if mid_epoch_checkpoint else (list_checkpoints(out_dir) or ["none"])[-1]
        bar.close()
        say(f"\nstopped by {why} at epoch {state['epoch'] + 1}, step {state['step']}; "
            f"checkpoint: {path}\nresume with: python {sys.argv[0]} --resume {out_dir}")
        raise SystemExit(130) from None
    finally:
        stop.restore()
    bar.close()

    # --- Save the fine-tuned model (on IPU the host copy, refreshed by detach).
    if pipelined:
        gather_pipeline_weights(model, stage_module, ranks)
    if ranks.is_main:
        model.save_pretrained(out_dir / "model")
        tokenizer.save_pretrained(out_dir / "model")
        say(f"model, metrics.jsonl and curves.png in {out_dir}")
    return state["metrics"]


def cli(argv=None):
    try:
        main(argv)
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())

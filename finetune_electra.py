#!/usr/bin/env python
"""Fine-tuning a pretrained transformer: ELECTRA on IMDB movie-review sentiment.

Graphcore's tutorial "Fine-tuning a pretrained transformer" as one script that runs
everywhere: on IPUs (where PopTorch imports) step by step as the tutorial, with pipeline
stages placed by `poptorch.BeginBlock`, `trainingModel`/`inferenceModel`, device
iterations and output (anchor) modes; on CUDA or CPU, the same recipe in plain PyTorch.

    python finetune_electra.py                        # the tutorial's recipe
    python finetune_electra.py --model DIR --dataset DIR --train-samples 2000

Part one, up to the banner "Part two" at line 454, is the tutorial in its order:
    1. Data: IMDB, tokenized           3. Pipeline stages: which layer on which IPU
    2. Model: ELECTRA, a new head      4. The IPU flow, in one function: finetune_on_ipus()
    5. finetune() and main(): what runs, and on which device
Part two is what a first reading may skip; each helper that part one calls is there under
its own name: argument checks, devices and torchrun's processes, the output directory,
data from disk, packing, the optimizer's controls (schedule, weight decay, clipping),
progress, checkpoints, results, the CUDA/CPU flow, torchrun's pipelines, prediction.
"""

import argparse
import codecs
import collections
import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import itertools
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow.compute
import torch
import torch.distributed as dist
from sklearn.metrics import accuracy_score, f1_score
from tqdm.auto import tqdm

# PopTorch comes with Graphcore's Poplar SDK; without it we run on CUDA or CPU.
# It asserts at import that torch is the one it was built for (2.0.1 for SDK 3.3
# and 3.4): that AssertionError is kept to be explained, not shown as a traceback.
POPTORCH_REFUSED = None
try:
    import poptorch
except ImportError:
    poptorch = None
except AssertionError as refused:
    poptorch, POPTORCH_REFUSED = None, str(refused)

import datasets
import transformers
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset, load_from_disk
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer


# ----------------------------------------------------------------------------
# 1. Data: IMDB movie reviews, tokenized.
#
# The tutorial loads IMDB from the Hugging Face Hub, trains on its train split
# and validates on its test split (25,000 reviews each, labels 0=neg, 1=pos),
# each review turned into ELECTRA's token ids, padded or cut to 512 tokens.
# ----------------------------------------------------------------------------

def load_splits(name):
    """`load_dataset("imdb")`, as the tutorial. --dataset PATH reads a local copy instead:
    a save_to_disk directory, parquet/csv/json files, or the aclImdb folder (part two)."""
    path = local_path("--dataset", name, "file or directory")
    if path is not None:
        return read_local_dataset(path)
    with loading("dataset", name):  # no hub reachable: one line on how to run offline
        return load_dataset(name)


def read_files(kind, files, split, root):
    """One split of local parquet, csv or json files, read by datasets as the hub's are."""
    with naming_unreadable(kind, files, split, root):
        return load_dataset(kind, data_files=files, split="train")


def tokenize_batch(batch, tokenizer, text_columns, max_length, padding, token_types):
    encoded = tokenizer(*(batch[c] for c in text_columns), truncation=True, max_length=max_length,
                        padding=padding, return_token_type_ids=token_types)
    encoded["length"] = [sum(mask) for mask in encoded["attention_mask"]]
    return encoded


def tokenize(ds, tokenizer, args, padding, token_types=False):
    """The tutorial's `map` of the tokenizer over the reviews, the text dropped and the
    label column renamed `labels`, as the model's forward names it. datasets caches the
    result: a second run reads it back. Kept besides: each review's length in tokens (to
    batch like lengths); token type ids only for sentence pairs (single texts: all zero)."""
    ds = ds.map(tokenize_batch, batched=True, desc="Tokenizing",
                remove_columns=[c for c in ds.column_names if c != args.label_column],
                fn_kwargs=dict(tokenizer=tokenizer, text_columns=args.text_column.split(","),
                               max_length=args.max_length, padding=padding,
                               token_types=token_types))
    if args.label_column != "labels":
        ds = ds.rename_column(args.label_column, "labels")
    return ds


# ----------------------------------------------------------------------------
# 2. Model: the pretrained ELECTRA encoder with a new classification head.
# ----------------------------------------------------------------------------

def load_model(name, label_names, eager_attention=False, say=print):
    """The tutorial's AutoModelForSequenceClassification: the pretrained encoder, and a
    new head with one output per label. eager_attention: PopTorch has no handler for the
    scaled_dot_product_attention newer transformers pick, so IPU graphs use plain matmuls."""
    path = local_path("--model", name, "directory")
    if path is not None:
        check_model_dir(path)  # a damaged or missing file named, not failed on in transformers
    attention = {"attn_implementation": "eager"} if eager_attention else {}
    with loading("model", name):  # its load report quiet: ours instead
        tokenizer = AutoTokenizer.from_pretrained(name)
        model, loaded = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            ignore_mismatched_sizes=True,  # a head fine-tuned for other labels starts afresh
            # cross-entropy, as other families pick at their first step; DeBERTa's own pick
            # selects the labelled rows by nonzero, which PopTorch does not compile
            problem_type="single_label_classification",
            output_loading_info=True, **attention)
    check_tokenizer_fits(name, model, tokenizer)  # the model's own, not a stand-in of 5 tokens
    say_what_is_new(model, loaded, say)
    return model, tokenizer


def load_data_and_model(args, padding, say, eager_attention):
    """The tutorial's data and model steps, in its order; only the splits used are tokenized."""
    splits = select_splits(load_splits(args.dataset), args.text_column, args.label_column)
    label_names = encode_labels(splits, args.label_column, args.label_names)
    say("labels: " + ", ".join(f"{i}={name}" for i, name in enumerate(label_names)))
    model, tokenizer = load_model(args.model, label_names, eager_attention,
                                  say=say if not args.resume else lambda *_: None)
    check_max_length(args.max_length, model, tokenizer)
    packing = packing_for(args, model, padding)  # None: a review per row, as the tutorial
    # "max_length" where shapes are static, as the tutorial; else batches pad as they are made.
    tokenize_padding = "max_length" if padding == "max_length" else False
    # The tutorial ends with set_format("torch"), so rows come out as tensors; Reviews
    # reads the token columns out of Arrow once instead (part two says why).
    pairs = "," in args.text_column  # sentence pairs (part two): with their token types
    train, eval_ds = (Reviews(tokenize(subset(splits[split], samples, args.seed), tokenizer, args,
                                       tokenize_padding, takes_token_types(model, pairs)))
                      for split, samples in (("train", args.train_samples),
                                             ("eval", args.eval_samples)))
    data = Data(train, eval_ds, tokenizer.pad_token_id, packing)
    return data, model, tokenizer


# ----------------------------------------------------------------------------
# 3. Pipeline stage plan: which module runs on which stage.
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
        most = num_layers + 1
        raise FinetuneError(f"{stages} stages need at least {stages - 1} encoder layers "
                            f"(one stage is the embeddings); this model has {num_layers}: "
                            f"use --ipus {most} or fewer (on IPUs a power of two: "
                            f"{1 << (most.bit_length() - 1)} or fewer)")
    return [1 + i * (stages - 1) // num_layers for i in range(num_layers)]


def plan_stages(model, stages):
    """[(module name, stage)] in forward order: what runs before the transformer blocks
    (embeddings) on stage 0, the blocks spread over the others, what runs after them
    (final norm, pooler, the head) on the last. Modules without weights (rotary tables)
    stay on the stage that runs them."""
    (blocks_name, blocks), base_name = transformer_blocks(model, stages), model.base_model_prefix
    parent = blocks_name.rpartition(".")[0]  # encoder (BERT), transformer (DistilBERT), none
    children = []  # the base model's, with the blocks' parent opened up
    for name, module in model.base_model.named_children():
        children += ([(f"{name}.{n}", m) for n, m in module.named_children()]
                     if name == parent else [(name, module)])
    plan, stage_of_block, seen_blocks = [], layer_stages(len(blocks), stages), False
    for name, module in children:
        if name == blocks_name:
            seen_blocks = True
            plan += [(f"{base_name}.{name}.{i}", s) for i, s in enumerate(stage_of_block)]
        elif any(True for _ in module.parameters()):
            plan.append((f"{base_name}.{name}", stages - 1 if seen_blocks else 0))
    plan += [(name, stages - 1) for name, module in model.named_children()  # the head
             if name != base_name and any(True for _ in module.parameters())]
    return plan


# ----------------------------------------------------------------------------
# 4. The IPU flow: the tutorial, step by step, in one function.
#
# Where it departs from the 2021 tutorial, on purpose (each is commented where
# it happens): gradient accumulation, which pipelined training needs since SDK
# 2.4; outputMode, the new name of anchorMode; eval batches padded so that every
# review is predicted; every optimizer step's loss brought back and counted.
# ----------------------------------------------------------------------------

class IPUWrapper(torch.nn.Module):
    """PopTorch needs to know which output is the loss it should minimise.

    In training the loss is wrapped in `poptorch.identity_loss` (reduction
    "none": the model already averaged it); the inference graph returns it as a
    plain output. trainingModel and inferenceModel each trace a shallow copy of
    this wrapper, whose own `training` flag PopTorch never changes: the wrapped
    model, which both copies share, is what is put in each mode before its
    graph is compiled, so that is the flag to read (as the tutorial's wrapper does).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        # RoBERTa and XLM-R number positions by an integer cumsum PopTorch does not
        # compile: made here by arange instead (texts are padded on the right).
        self.first_position = first_position(model)

    def forward(self, input_ids, attention_mask, labels, loss_weights=None, position_ids=None,
                token_type_ids=None):
        if position_ids is None and self.first_position is not None:
            position_ids = (torch.arange(input_ids.shape[1]) + self.first_position).expand_as(
                input_ids)
        given = {"loss_weights": loss_weights, "position_ids": position_ids,  # packed rows,
                 "token_type_ids": token_type_ids}  # section 11; sentence pairs, part two
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                         **{name: value for name, value in given.items() if value is not None})
        if self.model.training:
            return poptorch.identity_loss(out.loss, reduction="none"), out.logits
        return out.loss, out.logits


def ipu_options(args, accumulation, training):
    # Device iterations: the IPU runs this many optimizer steps (in training) per
    # call from the host, which is out of the loop meanwhile.
    opts = poptorch.Options().deviceIterations(args.device_iterations)
    # Replicas: copies of the whole pipeline on their own IPUs, each on rows of its
    # own; their gradients are averaged into each step (PopTorch's default
    # ReductionType.Mean), as DDP does.
    opts.replicationFactor(args.replicas)
    # Compiling takes minutes: keep the executables, and a second run with the
    # same graphs loads them instead.
    if args.executable_cache != "none":
        opts.enableExecutableCaching(args.executable_cache)
    # Output mode All: validation needs every prediction (the tutorial's
    # anchorMode(All)); in training it brings back every micro-batch's loss, so
    # each optimizer step's loss is known (the default, Final, returns the last
    # micro-batch's only). That is 56 losses and 224 x 2 logits per call: < 2 KB.
    # The tutorial's anchorMode(All) was renamed outputMode in SDK 2.4, and the old name
    # removed in 2.5: whichever this SDK has.
    if hasattr(opts, "outputMode"):
        opts.outputMode(poptorch.OutputMode.All)
    else:
        opts.anchorMode(poptorch.AnchorMode.All)
    if training:
        opts.Training.gradientAccumulation(accumulation)
    return opts


def place_on_ipus(model, plan):
    """poptorch.BeginBlock starts a new pipeline stage at each planned module."""
    for name, stage in plan:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, poptorch.BeginBlock(getattr(parent, attr), name, ipu_id=stage))


def gradient_accumulation(args, stages):
    """--gradient-accumulation, else 2 x stages - 1: enough micro-batches to fill and
    drain a pipeline's forward and backward stages (1 without stages)."""
    return args.gradient_accumulation or 2 * stages - 1


def validate_on_ipus(inference_model, eval_loader, eval_reviews, labels, progress, between=None):
    """The tutorial's validation: attach the inference model (which uploads the trained
    weights), predict every eval batch, detach. Accuracy, F1, loss, and the seconds.
    between: the training model, attached (--eval-steps, mid-epoch): the same swap, at a
    boundary of host calls: detached first, attached again after."""
    if between is not None:
        between.detachFromDevice()
    inference_model.attachToDevice()
    # Each batch's logits (loss, logits), counted as the CUDA/CPU flow's evaluate() does.
    figures = evaluate(lambda batch: inference_model(**batch)[1], eval_loader, eval_reviews,
                       labels, progress)
    inference_model.detachFromDevice()
    if between is not None:
        between.attachToDevice()
    return figures


def finetune_on_ipus(args, model, plan, data, run):
    """The tutorial's flow on IPUs with PopTorch, in its order."""
    # Pipelined training needs 2 x stages - 1 micro-batches per optimizer step or more
    # to fill and drain the pipeline; PopTorch checks it since SDK 2.4, after the
    # tutorial was written. So an optimizer step sees 4 x 7 = 28 samples, not 4.
    accumulation = gradient_accumulation(args, args.stages)
    train_opts = ipu_options(args, accumulation, training=True)
    eval_opts = ipu_options(args, 1, training=False)

    # poptorch.DataLoader makes host batches of batch x device iterations (x the
    # accumulation in training, x the replicas) samples: 4 x 8 x 7 = 224 per training
    # call on the tutorial's 4 IPUs. With --padding packed a sample is a row of
    # reviews, packed afresh each epoch, shuffled and in step order (section 11).
    step_rows = args.batch_size * accumulation * args.replicas
    host_batch = step_rows * args.device_iterations
    data.require_train(host_batch, f"one IPU host batch ({args.batch_size} x "
                          f"{args.device_iterations} device iterations x {accumulation} accumulated"
                          + (f" x {args.replicas} replicas)" if args.replicas > 1 else ")"))
    train_set = data.train_dataset(step_rows, accumulation * args.replicas, multiple=host_batch)
    shuffle = torch.Generator()  # seeded each epoch: a resumed epoch's order is the same
    train_loader = poptorch.DataLoader(train_opts, train_set, batch_size=args.batch_size,
                                       shuffle=not data.packing, drop_last=True, generator=shuffle)
    # A static graph cannot take a short last batch. The tutorial dropped it; here the
    # eval set is padded to whole batches (repeats of its first review, or empty packed
    # rows) whose extra predictions are ignored: accuracy is over every review.
    eval_set, eval_reviews = data.eval_dataset(host_batch // accumulation)  # eval: no accumulation
    eval_loader = poptorch.DataLoader(eval_opts, eval_set, batch_size=args.batch_size,  # its own
                                      shuffle=False, drop_last=True, generator=torch.Generator())

    # Pipeline stages, the wrapper naming the loss, PopTorch's AdamW, the two models.
    run.say(stage_table(model, plan, "applied with poptorch.BeginBlock"))
    place_on_ipus(model, plan)
    wrapped = IPUWrapper(data.classifier(model))  # --padding packed: a PackedClassifier
    optimizer = ipu_adamw(wrapped, args)
    training_model = poptorch.trainingModel(wrapped, options=train_opts, optimizer=optimizer)
    inference_model = poptorch.inferenceModel(wrapped, options=eval_opts)

    # Compile each model on one batch, then detach it: a training and an
    # inference model cannot hold the same IPUs at once. A graph is traced in
    # the mode the model is in then (dropout, identity_loss): set it first.
    for name, ipu_model, loader in (("training", training_model, train_loader),
                                    ("inference", inference_model, eval_loader)):
        wrapped.model.train(name == "training")
        batch, start = next(iter(loader)), time.perf_counter()
        ipu_model.compile(**batch)
        ipu_model.detachFromDevice()
        run.say(f"{name} graph compiled (or loaded from --executable-cache) in "
                f"{time.perf_counter() - start:.1f} s")
    # Checkpoints: the host's weights and PopTorch's optimizer state; --resume loads them here.
    run.checkpoints.hold(model, optimizer, mid_epoch=False)
    run.checkpoints.resume_if_asked()
    validate = functools.partial(validate_on_ipus, inference_model, eval_loader, eval_reviews,
                                 data.eval_labels, run.progress)
    run.start(model, steps_per_epoch=len(train_loader) * args.device_iterations,
              evaluate=functools.partial(validate, between=training_model),  # --eval-steps
              multiple=args.device_iterations, eval_batches=len(eval_loader),
              step_rows=step_rows, accumulation=accumulation, **ipu_summary(args, host_batch, data))
    for epoch in run.epochs():
        data.pack_epoch(epoch)
        shuffle.manual_seed(args.seed + epoch)
        training_model.attachToDevice()
        # Host calls: fewer where --max-steps ends the epoch; a resumed one skips those made.
        done, calls = (steps // args.device_iterations
                       for steps in (run.state["step"], run.plan.in_epoch(epoch)))
        for batch in itertools.islice(train_loader, done, calls):
            # The lr schedule reaches the IPU only through setOptimizer, so it changes once
            # per host call (--device-iterations steps); the default constant lr never does.
            if run.schedule.update(optimizer, run.state["global_step"]):
                training_model.setOptimizer(optimizer)
            losses, _ = training_model(**batch)
            run.progress.advance(args.device_iterations)  # the bar counts optimizer steps
            # One call ran device-iterations optimizer steps: one loss for each (the mean of
            # its micro-batches', on every replica), counted as the CPU loop counts them.
            step_losses = losses.reshape(args.device_iterations, -1).mean(1)
            run.steps_done(step_losses.tolist(), samples_in(batch), updates_applied=True)
        training_model.detachFromDevice()  # the trained weights come back to the host
        run.end_epoch(validate)  # validates (each epoch, as the tutorial), "Accuracy: 0.xxx"


# ----------------------------------------------------------------------------
# 5. finetune() and main(): what runs, and on which device.
# ----------------------------------------------------------------------------

def finetune(args, device, ranks):
    """Data, model and stage plan; the IPU flow or the CUDA/CPU one; the fine-tuned model.

    ranks: this process's place among torchrun's processes (alone: rank 0 of 1)."""
    on_ipu = args.device == "ipu"
    say = ranks.voice()  # rank 0 speaks for all
    padding = choose_padding(args, static=on_ipu or ranks.stages > 1)
    check_output_dir(args)  # in use, or holding another run: refused before any loading
    transformers.set_seed(args.seed)  # Python's, NumPy's and torch's generators
    with ranks.main_first():  # rank 0 fills the datasets cache, the others read it
        data, model, tokenizer = load_data_and_model(args, padding, say, eager_attention=on_ipu)
    if ranks.enabled:  # same initial weights everywhere, but each rank its own dropout masks
        torch.manual_seed(args.seed + ranks.rank)
    stages = args.stages if on_ipu else ranks.stages  # torchrun: its stages
    plan = plan_stages(model, stages) if on_ipu or stages > 1 else None  # where placed

    # Only now the output directory: a start that fails above leaves nothing behind.
    with run_directory(args, ranks, say) as out_dir:  # this run's alone, locked
        run = Run(args, out_dir, ranks, data, padding, tokenizer, say)
        try:
            if on_ipu:
                finetune_on_ipus(args, model, plan, data, run)
            else:
                finetune_with_torch(args, device, model, plan, data, ranks, run)
        except EarlyStop:  # --early-stopping-patience: the run ends, its best model kept
            run.progress.write_results()
        except (Interrupted, StopNow) as why:  # Ctrl-C, SIGTERM: save (a second: don't), exit
            exit_on_stop(run, why)
        finally:
            run.close()

        # The fine-tuned model (on IPU the host copy, refreshed by the last detach), or
        # with --load-best-model-at-end the best evaluation's.
        if ranks.is_main:
            save_model(out_dir, model, tokenizer, say,
                       best=run.state["best"] if args.load_best_model_at_end else None)
            say(f"model, metrics.jsonl and curves.png in {out_dir}")
        return run.state["metrics"]


def main(argv=None):
    """Fine-tune on the device there is, or with --predict classify texts.

    The arguments' defaults are the tutorial's recipe (build_parser, part two)."""
    args = parse_args(argv)  # and checked: bad input ends in one `error:` line
    if args.predict:
        return predict_texts(args)

    device = pick_device(args.device)  # auto: IPU if PopTorch imports, else CUDA, else CPU
    args.device = "ipu" if device == "ipu" else device.type
    check_device_args(args)
    ranks = setup_distributed(args, device)  # under torchrun: this process's rank
    try:
        return finetune(args, device, ranks)
    finally:
        if ranks.enabled:
            dist.destroy_process_group()


# ============================================================================
# Part two: beyond the tutorial
#
# What part one calls for all that is not the tutorial itself: checks of what
# the user gave, other data formats, the same recipe on CUDA/CPU and under
# torchrun, packing, progress, checkpoints, results and prediction. A first
# reading may stop here, and come back for a name.
# ============================================================================


# ----------------------------------------------------------------------------
# 6. Arguments and their checks: the defaults are the tutorial's recipe.
# ----------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    """argparse's own errors (a word where a number goes) as one `error:` line, like ours."""

    def error(self, message):
        raise FinetuneError(message)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Each flag's default after its help, once: not where the help says it (or None)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


BUCKET = 64  # --padding buckets: batch lengths are multiples of this (8 shapes at 512)
PACKED_MAX_PER_ROW = 4  # IMDB at 512 tokens: rows 98.7% full (3: 98.5%, 2: 91%)


# A Trainer user types its names and values: HfArgumentParser reads a boolean as a bare flag
# or as true/false, yes/no, 1/0, and a step count below 1 as a ratio of all training steps.
def yes_or_no(text):
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(
        str(text).lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a yes or no (true, false, yes, no, "
                                         "1, 0)")
    return value


TRAINER_BOOL = dict(nargs="?", const=True, default=False, type=yes_or_no)
# --bf16, --group-by-length: auto, or the Trainer's boolean.
AUTO_YES_NO = dict(choices=["auto", "yes", "no"], default="auto", nargs="?", const="yes",
                   type=lambda v: v if v == "auto" else "yes" if yes_or_no(v) else "no")
RATIO_HELP = "a number below 1 is a ratio of all training steps, as in the Trainer"
DEVICES = ("auto", "ipu", "cuda", "cpu")


def number(text):
    """A whole number as an int (3, not 3.0), else a float."""
    value = float(text)
    return int(value) if value.is_integer() else value


def step_count(text):
    """A count of optimizer steps, or (below 1) a ratio of all of them: StepPlan.steps."""
    value = number(text)
    if value > 1 and not isinstance(value, int):
        raise argparse.ArgumentTypeError(f"{text}: a whole number of steps, or a ratio below 1")
    return value


def build_parser():
    p = ArgumentParser(
        description="Fine-tune ELECTRA (or another sequence classifier) for text classification, "
        "as in Graphcore's tutorial, on IPU, CUDA or CPU.",
        formatter_class=DefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--model", default="google/electra-small-generator",
                      help="hub name or a directory saved with save_pretrained")
    data.add_argument("--dataset", default="imdb",
                      help="hub name, a save_to_disk directory, a directory of "
                      "train/test parquet|csv|json(l) files, or the aclImdb folder")
    data.add_argument("--text-column", default="text", help="the column holding the texts")
    data.add_argument("--label-column", default="label",
                      help="the column holding the labels (integers or text)")
    data.add_argument("--label-names",
                      help="comma-separated names for integer labels 0,1,... (e.g. neg,pos); "
                      "for text labels, the order of their ids (exactly the labels found)")
    data.add_argument("--max-length", type=int, default=512, help="tokens kept per text")
    data.add_argument("--padding", choices=["auto", "max_length", "dynamic", "buckets", "packed"],
                      default="auto", help="max_length: every text to --max-length (the "
                      "tutorial; static shapes); dynamic: to each batch's longest; buckets: that, "
                      f"rounded up to a multiple of {BUCKET} tokens (a few static shapes, for CUDA "
                      "graphs); packed: several per row, each computed alone. auto: max_length on "
                      "IPU/pipelines, buckets on CUDA, dynamic on CPU")
    data.add_argument("--max-per-row", type=int, help=f"--padding packed: at most this many "
                      f"texts in a row (default {PACKED_MAX_PER_ROW})")
    data.add_argument("--group-by-length", **AUTO_YES_NO,
                      help="batch texts of similar length together (auto: with dynamic padding)")
    data.add_argument("--train-sampling-strategy", dest="group_by_length",
                      choices=["auto", "yes", "no"], default=argparse.SUPPRESS,
                      type=lambda v: {"group_by_length": "yes", "random": "no"}.get(v, v),
                      help="transformers 5's name: group_by_length (--group-by-length yes) or "
                      "random (no)")
    data.add_argument("--train-samples", type=int,
                      help="train on a random subset of this size (seeded)")
    data.add_argument("--eval-samples", type=int,
                      help="evaluate on a random subset of this size (seeded)")

    add_training_arguments(p)

    ipu = p.add_argument_group("IPU and pipeline")
    ipu.add_argument("--ipus", "--stages", dest="stages", type=int, default=4,
                     help="pipeline stages: IPUs on IPU, ranks per pipeline under torchrun")
    ipu.add_argument("--device-iterations", type=int, default=8,
                     help="IPU: steps run on the device per call from the host; "
                     "torchrun pipeline: micro-batches per eval batch")
    ipu.add_argument("--replicas", type=int, default=1,
                     help="IPU: copies of the pipeline, each on its own IPUs, averaging their "
                     "gradients (replicationFactor); under torchrun the process count sets them")
    ipu.add_argument("--executable-cache", default=str(Path.home() / ".cache" / "finetune_electra"
                                                       / "executables"),
                     help="IPU: where compiled graphs are kept, so that a second run with the "
                     "same graphs skips compiling; 'none' turns it off")
    ipu.add_argument("--schedule", choices=["gpipe", "1f1b"], default="1f1b",
                     help="torchrun pipeline schedule")
    add_trainer_arguments(p)
    add_output_arguments(p)
    return p


def add_training_arguments(p):
    """The tutorial's recipe (epochs, batch, lr) and how it runs (device, precision, logging);
    the Trainer's names for them too."""
    train = p.add_argument_group("training")
    train.add_argument("--epochs", "--num-train-epochs", type=number, default=3,
                       help="passes over the train split (a fraction ends the last one early, "
                       "as the Trainer's)")
    train.add_argument("--batch-size", "--per-device-train-batch-size", type=int, default=4,
                       help="samples per micro-batch")
    train.add_argument("--eval-batch-size", "--per-device-eval-batch-size", type=int,
                       help="default: batch size x device iterations, the tutorial's "
                       "eval host batch (IPUs and torchrun pipelines: always that)")
    train.add_argument("--lr", "--learning-rate", type=float, default=1e-6,
                       help="AdamW learning rate")
    train.add_argument("--gradient-accumulation", "--gradient-accumulation-steps", type=int,
                       help="micro-batches per optimizer step (default: 2 x stages - 1 on "
                       "pipelined IPUs, as PopTorch requires since SDK 2.4; 1 elsewhere)")
    train.add_argument("--seed", type=int, default=42,
                       help="seeds the head's initial weights, the shuffles and dropout")
    train.add_argument("--device", choices=DEVICES, default="auto",
                       help="auto: ipu if PopTorch imports, else cuda if available, else cpu")
    train.add_argument("--use-cpu", dest="device", nargs="?", const="cpu",
                       default=argparse.SUPPRESS,
                       type=lambda v: v if v in DEVICES else "cpu" if yes_or_no(v) else "auto",
                       help="the Trainer's name for --device cpu")
    train.add_argument("--compile", "--torch-compile", **TRAINER_BOOL,
                       help="torch.compile the model (CUDA/CPU)")
    train.add_argument("--cuda-graphs", choices=["auto", "yes", "no"], default="auto",
                       help="replay each train and eval step as a CUDA graph (auto: on one CUDA "
                       "process with static shapes)")
    train.add_argument("--bf16", **AUTO_YES_NO,
                       help="bfloat16 autocast (auto: the card's best: bfloat16 on CUDA compute "
                       "capability 8.0 and newer, else float16 with loss scaling; CPU float32)")
    train.add_argument("--fp16", **TRAINER_BOOL,
                       help="float16 autocast with dynamic loss scaling (CUDA/CPU)")
    train.add_argument("--log-every", "--logging-steps", type=step_count, default=10,
                       help=f"steps between loss readings (progress bar, loss curve); {RATIO_HELP}")
    train.add_argument("--on-nan", choices=["stop", "skip"], default="stop",
                       help="on a non-finite loss: stop (after saving), or skip that step")


def add_trainer_arguments(p):
    """The controls a fine-tuner reaches for, named (and meant) as in HF's TrainingArguments.
    Their defaults keep the tutorial's recipe: a constant lr, no clipping, no extra evaluation."""
    sched = p.add_argument_group("schedule, regularisation and evaluation (as HF's Trainer)")
    sched.add_argument("--lr-scheduler-type", choices=["constant", "linear", "cosine"],
                       default="constant", type=lambda v: {"constant_with_warmup": "constant"}
                       .get(v, v), help="the lr after warm-up: constant (the tutorial; with a "
                       "warm-up, the Trainer's constant_with_warmup), or decaying to 0 at the "
                       "last step, linearly or along a cosine")
    sched.add_argument("--warmup-ratio", type=float, default=0.0,
                       help="warm-up: the lr rises linearly from 0 over this share of all steps "
                       "(transformers 4's name; 5 takes the ratio in --warmup-steps)")
    sched.add_argument("--warmup-steps", type=step_count, default=0,
                       help=f"warm-up over this many optimizer steps; {RATIO_HELP}")
    sched.add_argument("--weight-decay", type=float, default=0.01,
                       help="AdamW's decoupled weight decay (its default, the tutorial's); "
                       "biases and LayerNorm weights are not decayed, as in the Trainer")
    sched.add_argument("--max-grad-norm", type=float,
                       help="clip the gradients' global norm to this (default: no clipping, "
                       "the tutorial; 0 too; the Trainer's: 1.0)")
    sched.add_argument("--max-steps", type=int,
                       help="train this many optimizer steps in all (overrides --epochs; -1: "
                       "none); --resume with a larger one trains on from where it stopped")
    sched.add_argument("--eval-strategy", choices=["no", "steps", "epoch"], default="epoch",
                       help="when to evaluate: at each epoch end (the tutorial; with "
                       "--eval-steps, also every N steps), every --eval-steps steps only "
                       "(without --eval-steps: every --log-every steps), or never")
    sched.add_argument("--eval-steps", type=step_count,
                       help=f"evaluate every N optimizer steps; {RATIO_HELP}")
    sched.add_argument("--load-best-model-at-end", **TRAINER_BOOL,
                       help="<output-dir>/model gets the weights of the best evaluation")
    sched.add_argument("--metric-for-best-model", choices=["accuracy", "f1", "loss"],
                       type=lambda v: v[len("eval_"):] if v.startswith("eval_") else v,
                       help="what 'best' means: the highest accuracy (with "
                       "--load-best-model-at-end alone), or macro F1, or the lowest eval loss "
                       "(eval_accuracy, eval_f1, eval_loss too)")
    sched.add_argument("--early-stopping-patience", type=int,
                       help="stop after this many evaluations without a better one (needs "
                       "--load-best-model-at-end)")
    sched.add_argument("--report-to", choices=["none", "tensorboard", "all"], default="none",
                       help="tensorboard: train loss, lr, eval metrics and speed as scalars "
                       "in <output-dir>/tensorboard (pip install tensorboard); all: every "
                       "integration installed (here tensorboard, if it is)")


def add_output_arguments(p):
    """Where results go, checkpoints, and prediction with a fine-tuned model."""
    out = p.add_argument_group("results and checkpoints")
    out.add_argument("--output-dir", help="default: runs/<timestamp>")
    out.add_argument("--save-every", "--save-steps", type=step_count, help="also checkpoint "
                     f"every N optimizer steps (always at each epoch end); {RATIO_HELP}")
    out.add_argument("--keep", "--save-total-limit", type=int, default=2, help="checkpoints kept")
    out.add_argument("--resume", "--resume-from-checkpoint", help="an output directory to "
                     "continue (or its newest checkpoint), 'auto' for the newest unfinished run "
                     "in runs/, or 'true': --output-dir's")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the run in --output-dir (it is kept until the new run's "
                     "first checkpoint is written)")

    pred = p.add_argument_group("prediction (no training)")
    pred.add_argument("--predict", metavar="MODEL_DIR",
                      help="classify TEXTS (or --predict-file) with a fine-tuned model: "
                      "<output-dir>/model, a checkpoint, or the output directory (its model, "
                      "else its newest checkpoint)")
    pred.add_argument("--predict-file", help="one text per line")
    pred.add_argument("texts", nargs="*", help="texts to classify with --predict")


def parse_args(argv=None):
    parser = build_parser()
    args = trainer_values(parser.parse_args(argv))
    if args.resume:
        args.resume = resolve_resume_dir(args.resume, args.output_dir)
        # Continue with the run's settings as last asked (args.json and what each resume
        # changed); anything given again on this command line wins.
        saved = run_settings(args.resume)
        parser.set_defaults(**{k: v for k, v in saved.items() if k not in NOT_RESUMED})
        resumed = trainer_values(parser.parse_args(argv))
        if resumed.model != saved["model"]:
            raise FinetuneError(f"{args.resume} was trained from --model {saved['model']}, "
                                f"not {resumed.model}: resume it without --model")
        if resumed.overwrite:
            raise FinetuneError("--overwrite starts a new run and --resume continues one: "
                                "give one of them")
        resumed.resume, resumed.output_dir = args.resume, str(args.resume)
        # What this resume changes of the run's settings: refused where it changes what the
        # saved state means, else kept and recorded (epochs, lr, --on-nan, cadences ...).
        resumed.changes = {k: (saved[k], v) for k, v in vars(resumed).items()
                           if k in saved and k not in NOT_RESUMED and saved[k] != v}
        fixed = [k for k in resumed.changes if k in FIXED_ON_RESUME]
        if fixed:
            flags = ", ".join(f"--{k.replace('_', '-')} {resumed.changes[k][0]} → "
                              f"{resumed.changes[k][1]}" for k in fixed)
            raise FinetuneError(f"--resume {args.resume}: {flags} would change what its "
                                "checkpoints mean; resume with the run's own settings, or start "
                                "a new run in a new --output-dir")
        args = resumed
        refuse_finished_resume(args)
    check_ranges(args)
    if (args.texts or args.predict_file) and not args.predict:
        raise FinetuneError("texts to classify (or --predict-file) need --predict MODEL_DIR")
    return args


def trainer_values(args):
    """The Trainer's values for "none" as ours (--max-steps -1, --max-grad-norm 0), its
    --eval-strategy steps without --eval-steps (every --log-every steps), --report-to all."""
    if args.max_steps == -1:
        args.max_steps = None
    if args.max_grad_norm == 0:
        args.max_grad_norm = None
    if args.eval_strategy == "steps" and not args.eval_steps:
        args.eval_steps = args.log_every
    if args.report_to == "all":
        args.report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    if args.load_best_model_at_end and not args.metric_for_best_model:
        args.metric_for_best_model = "accuracy"  # the tutorial's measure (the Trainer: loss)
    return args


NOT_RESUMED = ("resume", "texts", "overwrite", "output_dir")
# What a checkpoint's state means depends on these: the data and its order, the shapes,
# the step's composition, the layout. Resuming with another value is refused.
FIXED_ON_RESUME = ("model", "dataset", "text_column", "label_column", "label_names",
                   "train_samples", "eval_samples", "max_length", "padding", "max_per_row",
                   "batch_size", "gradient_accumulation", "stages", "replicas", "seed")


# What each number must be, as (argument, test, words for the error); optional ones
# that were not given are None and skipped. The model's own limit on --max-length is
# checked when the model is loaded.
COUNTS = ("batch_size", "eval_batch_size", "gradient_accumulation", "stages",
          "max_per_row", "device_iterations", "replicas", "train_samples", "eval_samples",
          "keep", "early_stopping_patience")
STEP_COUNTS = ("log_every", "save_every", "eval_steps")  # or ratios of all steps: step_count
NUMBER_RANGES = [(name, lambda v: v >= 1, "at least 1") for name in COUNTS] + [
    (name, lambda v: v > 0, f"more than 0 ({RATIO_HELP})") for name in STEP_COUNTS] + [
    ("epochs", lambda v: v > 0, "more than 0"),
    ("max_steps", lambda v: v >= 1, "at least 1, or -1 for none (--epochs decides)"),
    ("max_length", lambda v: v >= 2, "at least 2 (the [CLS] and [SEP] tokens)"),
    ("seed", lambda v: 0 <= v < 2**32, "from 0 to 4294967295 (what numpy's generator takes)"),
    ("lr", lambda v: 0 < v <= 1, "more than 0 and at most 1 (above that AdamW only diverges)"),
    ("warmup_ratio", lambda v: 0 <= v < 1, "from 0 up to, not including, 1"),
    ("warmup_steps", lambda v: v >= 0, "0 or more"),
    ("weight_decay", lambda v: 0 <= v < 1, "from 0 up to, not including, 1"),
    ("max_grad_norm", lambda v: v > 0, "more than 0, or 0 for no clipping"),
]
# Settings that only mean something beside another: (given, needed, why), refused alone
# rather than silently doing nothing.
NEEDS = [
    (lambda a: a.early_stopping_patience, lambda a: a.load_best_model_at_end,
     "--early-stopping-patience needs --load-best-model-at-end: early stopping keeps the best "
     "model, not the last"),
    (lambda a: a.metric_for_best_model, lambda a: a.load_best_model_at_end,
     "--metric-for-best-model says which evaluation's model --load-best-model-at-end keeps: "
     "give both, or neither"),
    (lambda a: a.load_best_model_at_end, lambda a: a.eval_strategy != "no",
     "--load-best-model-at-end needs evaluations: --eval-strategy epoch or steps"),
    (lambda a: a.eval_steps and a.eval_strategy == "no", lambda a: False,
     "--eval-steps with --eval-strategy no: give --eval-strategy steps (or epoch) to evaluate"),
    (lambda a: a.warmup_ratio and a.warmup_steps, lambda a: False,
     "--warmup-ratio and --warmup-steps: give one (transformers 5 takes a ratio below 1 in "
     "--warmup-steps)"),
    (lambda a: a.fp16 and a.bf16 == "yes", lambda a: False,
     "--fp16 and --bf16 yes: choose one precision"),
]


def check_ranges(args):
    """Every number in its range before any work, with the flag named."""
    for name, in_range, words in NUMBER_RANGES:
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and in_range(value)):
            raise FinetuneError(f"--{name.replace('_', '-')} {value}: must be {words}")
    if args.label_names is not None and not all(args.label_names.split(",")):
        raise FinetuneError(f"--label-names {args.label_names!r}: a name is empty")
    for given, needed, why in NEEDS:
        if given(args) and not needed(args):
            raise FinetuneError(why)


def check_device_args(args):
    """Flags this device cannot honour, refused before minutes of loading (on IPUs, and
    of compiling, what PopTorch would refuse)."""
    in_pipeline = "RANK" in os.environ and args.stages > 1  # torchrun's pipeline stages
    stages, ipus, on_ipu = args.stages, args.stages * args.replicas, args.device == "ipu"
    if on_ipu and (ipus & (ipus - 1) or ipus > 64):  # popart_compiler's CompilerImpl.cpp
        raise FinetuneError(f"--ipus {stages} x --replicas {args.replicas} = {ipus} IPUs: PopTorch "
                            "reserves IPUs in powers of two (at most 64 per process), so use "
                            "stage and replica counts of 1, 2, 4, 8 or 16")
    if on_ipu and args.device_iterations < stages:
        raise FinetuneError(f"--device-iterations {args.device_iterations} cannot fill a "
                            f"{stages}-stage pipeline: use at least {stages}")
    for given, why in ((args.on_nan == "skip", "--on-nan skip is not possible on IPU: the "
                        "device applies each step before the host sees its loss"),
                       (args.save_every, "--save-every is not available on IPU: the weights "
                        "reach the host only on detach, so checkpoints are taken at epoch ends"),
                       (args.fp16, "--fp16 is for CUDA and CPU: on IPUs half precision is the "
                        "model's own dtype, with a static loss scale (not in this script)")):
        if on_ipu and given:
            raise FinetuneError(why)
    for name in ("eval_steps", "max_steps"):  # the host acts between calls, not within one
        value = getattr(args, name)  # (a ratio is rounded up to a multiple: StepPlan.steps)
        if on_ipu and value and value >= 1 and value % args.device_iterations:
            raise FinetuneError(f"--{name.replace('_', '-')} {value}: on IPUs a multiple of "
                                f"--device-iterations ({args.device_iterations}), as each host "
                                "call runs that many steps")
    if not on_ipu and args.replicas > 1:
        raise FinetuneError("--replicas is for IPUs; on CUDA/CPU start one process per replica "
                            "with torchrun (see the README)")
    if not on_ipu and in_pipeline and (args.fp16 or args.bf16 == "yes"):
        raise FinetuneError(f"{'--fp16' if args.fp16 else '--bf16 yes'}: torchrun's pipeline "
                            "stages are traced in float32; use --stages 1 (data parallel)")
    if args.eval_batch_size and (on_ipu or in_pipeline):
        raise FinetuneError("--eval-batch-size: on IPUs and in torchrun pipelines an eval "
                            "batch is --batch-size x --device-iterations (static shapes); leave "
                            "it out")
    if args.fp16 and args.device == "cpu" and not fp16_autocast_works("cpu"):
        raise FinetuneError(f"--fp16: this torch ({torch.__version__}) has no float16 autocast "
                            "on a CPU; train in float32 (leave --fp16 out)")
    if args.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise FinetuneError("--report-to tensorboard needs the tensorboard package: pip "
                                "install tensorboard (the versions in requirements-test.txt)"
                                ) from None



# ----------------------------------------------------------------------------
# 7. Device and processes: which device, which rank under torchrun, the seeds.
#
# Alone, a process is rank 0 of 1. Under torchrun each process is one rank;
# section 21 maps the tutorial's IPU ideas onto them.
# ----------------------------------------------------------------------------

def pick_device(requested):
    if POPTORCH_REFUSED and requested in ("auto", "ipu"):
        raise FinetuneError(f"PopTorch is installed but will not import ({POPTORCH_REFUSED}): "
                            "install the IPU host's versions with pip install -r "
                            "requirements-ipu.txt, or pass --device cpu or cuda")
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


class Ranks:
    """Where this process sits: its rank, pipeline stage and replica."""

    def __init__(self, rank=0, world=1, stages=1):
        self.enabled = world > 1 or "RANK" in os.environ
        self.rank, self.world, self.stages = rank, world, stages
        self.per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # torchrun's, per node
        self.replicas = world // stages
        self.stage, self.replica = rank % stages, rank // stages
        self.is_main = rank == 0
        self.pp_group = self.dp_group = None
        self.device = torch.device("cpu")  # where collectives' tensors live

    def describe(self, device):
        if not self.enabled:
            return str(device)
        return (f"{device.type}, torchrun: {self.world} ranks = {self.replicas} replica(s) x "
                f"{self.stages} stage(s)")

    def voice(self):
        """print on rank 0, which speaks for all; the other ranks, datasets and transformers
        included, keep quiet."""
        if self.is_main:
            return print
        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
        return lambda *_, **__: None

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 tokenizes first and fills the datasets cache; the others read it."""
        if self.enabled and not self.is_main:
            dist.barrier()
        yield
        if self.enabled and self.is_main:
            dist.barrier()

    def average_over_replicas(self, tensor):
        """In place, the mean of every replica's `tensor`: a step's loss as the whole step saw
        it, or a gradient."""
        if self.replicas > 1:
            dist.all_reduce(tensor, group=self.dp_group)
            tensor /= self.replicas
        return tensor


TORCH_VERSION = tuple(int(part) for part in torch.__version__.split(".")[:2])  # (2, 13)
TRANSFORMERS_VERSION = tuple(int(part) for part in transformers.__version__.split(".")[:2])


def setup_distributed(args, device):
    if "RANK" not in os.environ:
        return Ranks()
    world = int(os.environ["WORLD_SIZE"])
    if device == "ipu":
        raise FinetuneError("torchrun is for CUDA and CPU; on IPUs, PopTorch replicates the model")
    if world % args.stages:
        raise FinetuneError(f"{world} processes cannot hold whole {args.stages}-stage pipelines: "
                            f"use --stages 1 (data parallel only) or a divisor of {world}")
    if args.stages > 1 and TORCH_VERSION < (2, 4):  # torch.distributed.pipelining came with 2.4
        raise FinetuneError(f"torchrun with --stages {args.stages} needs torch.distributed."
                            "pipelining, in torch 2.4 or newer (this is torch "
                            f"{torch.__version__}): use --stages 1 (data parallel) or a newer "
                            "torch")
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


def ipu_summary(args, host_batch, data):
    """The summary's rows for IPUs: their count, and what one host call holds."""
    return dict(device=(f"IPU, {args.stages} pipeline stages x {args.replicas} replica(s) = "
                        f"{args.stages * args.replicas} IPUs"),
                extra={"device iterations": f"{args.device_iterations} optimizer steps per call",
                       "host batch": counted(host_batch, data.unit),
                       "executable cache": args.executable_cache})


# ----------------------------------------------------------------------------
# 8. The output directory: one run in each, locked while it runs; its life (finished or
#    not, set aside by --overwrite and put back, resumed) read from its files.
# ----------------------------------------------------------------------------

@contextlib.contextmanager
def run_directory(args, ranks, say):
    """The run's output directory, held until the run ends: rank 0 makes it, locks it and
    claims it for this run; every rank gets its name."""
    lock = None
    if ranks.is_main:
        try:
            out_dir = Path(args.output_dir) if args.output_dir else new_run_dir()
            out_dir.mkdir(parents=True, exist_ok=True)
            lock = DirectoryLock(out_dir, say)
            claim_output_dir(out_dir, args, say)
        except OSError as exc:
            raise FinetuneError(f"cannot write to the output directory "
                                f"{exc.filename or args.output_dir}: {exc.strerror}") from None
    if ranks.enabled:  # the name has a timestamp: everyone takes rank 0's
        shared = [str(out_dir) if ranks.is_main else None]
        dist.broadcast_object_list(shared)
        out_dir = Path(shared[0])
    try:
        yield out_dir
    finally:
        if lock:
            lock.release()


def new_run_dir():
    """runs/<timestamp>, made here; -2, -3 ... where another run took that name."""
    base = Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        out_dir = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            out_dir.mkdir()
            return out_dir
        except FileExistsError:
            continue
    raise FinetuneError(f"runs/ holds 999 runs named {base.name}: use --output-dir")


class DirectoryLock:
    """One process at a time per output directory: an exclusive flock on DIR/.lock,
    whose text names its holder. The kernel drops a flock with its process, so a
    killed run leaves only the text behind: the next run takes the lock and says so.
    """

    def __init__(self, out_dir, say):
        self.file = open(out_dir / ".lock", "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise DirectoryLock.in_use(out_dir, holder) from None
        self.file.seek(0)
        left = self.file.read().strip()
        if left:
            say(f"note: {out_dir} had a stale lock ({left}, no longer running): taking it over")
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} "
                        f"(since {datetime.now():%Y-%m-%d %H:%M:%S})")
        self.file.flush()

    def release(self):
        self.file.truncate(0)  # a run that ends cleanly leaves no stale lock
        self.file.close()      # and closing drops the flock

    @staticmethod
    def holder(out_dir):
        """Who holds the directory's lock now (its text), or None; takes nothing."""
        try:
            with open(out_dir / ".lock") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    return f.read().strip() or "another process"
        except OSError:  # no lock file: no run there yet
            pass
        return None

    @staticmethod
    def in_use(out_dir, holder):
        return FinetuneError(f"{out_dir} is in use by {holder}: wait for that run to end, or "
                             "use another --output-dir")


BEST = "best"  # --load-best-model-at-end: the best evaluation's model
RUN_FILES = ("args.json", "resumes.jsonl", "metrics.jsonl", "loss_curve.json", "curves.png",
             "checkpoints", "model", BEST, "tensorboard")
OVERWRITTEN = ".overwritten"  # a replaced run, until its replacement has a checkpoint


def claim_output_dir(out_dir, args, say):
    """A directory holds one run. A new run refuses one that holds another (unless
    --overwrite); a resumed one records what it changed, and args.json stays the
    record of how the run started."""
    if args.resume:
        if args.changes:
            say("resuming with changed settings: " + ", ".join(
                f"{k} {old} → {new}" for k, (old, new) in args.changes.items()))
        with open(out_dir / "resumes.jsonl", "a") as f:
            f.write(json.dumps({"when": f"{datetime.now():%Y-%m-%d %H:%M:%S}",
                                "changed": args.changes}) + "\n")
        return
    held = refuse_held_run(args, out_dir)
    if held:
        set_aside(out_dir)
        say(f"--overwrite: the run in {out_dir} is kept in {out_dir / OVERWRITTEN} until this "
            "one's first checkpoint is written")
    saved = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
             if k != "changes"}
    (out_dir / "args.json").write_text(json.dumps(saved, indent=2))


def check_output_dir(args):
    """Before minutes of loading: a directory in use, or holding another run, is refused
    now (and again when the run takes it, under its lock)."""
    if args.output_dir:
        out_dir = Path(args.output_dir)
        holder = DirectoryLock.holder(out_dir)
        if holder:
            raise DirectoryLock.in_use(out_dir, holder)
        if not args.resume:
            refuse_held_run(args, out_dir)


def refuse_held_run(args, out_dir):
    """A new run in a directory that holds a run is refused, unless --overwrite; returns
    what the directory holds (None: nothing to keep)."""
    held = describe_run(out_dir)
    if held and not args.overwrite:
        raise FinetuneError(f"--output-dir {out_dir} holds {held}: continue it with --resume "
                            f"{out_dir}, or pass a new --output-dir (--overwrite replaces it)")
    return held


def describe_run(out_dir):
    """What a directory holds, in a few words, or None if it holds nothing to keep (a
    run that stopped before its first epoch or checkpoint leaves only its args.json)."""
    if (out_dir / OVERWRITTEN).exists():
        return (f"in {OVERWRITTEN} a run that --overwrite set aside "
                f"({describe_run(out_dir / OVERWRITTEN)}), whose replacement stopped before "
                "its first checkpoint (--resume puts that run back)")
    if not (out_dir / "args.json").is_file():
        return None
    lines, checkpoints = metric_lines(out_dir), list_checkpoints(out_dir)
    metrics = epoch_lines(lines)
    if not (metrics or checkpoints or (out_dir / "model").is_dir()):
        return None
    settings = run_settings(out_dir, unknown_if_damaged=True)
    epochs = settings.get("epochs", "?")
    if is_finished(out_dir, settings, lines):
        accuracy = [m["accuracy"] for m in lines if "accuracy" in m][-1:]
        steps = newest_state(out_dir).get("global_step", 0)
        trained = (f"{steps:,} optimizer steps" if settings.get("max_steps")
                   else f"{epochs:g} epoch{'s' if epochs != 1 else ''}")
        return f"a finished run: {trained}" + "".join(f", accuracy {a:.3f}" for a in accuracy)
    newest = f"newest checkpoint {checkpoints[-1].name}" if checkpoints else "no checkpoint"
    return f"an unfinished run: {len(metrics)} of {epochs} epochs done, {newest}"


def is_finished(out_dir, settings=None, lines=None):
    """Its model saved, and (its settings as last asked; `lines`: its metric_lines; each
    read here where not given) stopped early, or its newest checkpoint at the last step its
    --max-steps or --epochs ask for."""
    if not (out_dir / "model").is_dir():
        return False
    lines = metric_lines(out_dir) if lines is None else lines
    settings = run_settings(out_dir, unknown_if_damaged=True) if settings is None else settings
    if any(m.get("stopped_early") for m in lines):
        return True
    if not any("train_loss" in m for m in lines):
        return False
    state = newest_state(out_dir)
    per_epoch, epochs = state.get("steps_per_epoch"), settings.get("epochs")
    total = settings.get("max_steps") or (
        math.ceil(epochs * per_epoch) if per_epoch and isinstance(epochs, (int, float)) else None)
    if total is None:  # a run from before steps_per_epoch was kept: count its epochs
        return isinstance(epochs, int) and len(epoch_lines(lines)) >= epochs
    return state.get("global_step", 0) >= total


def newest_state(out_dir):
    """The run's state in its newest checkpoint ({} where there is none, or it is damaged)."""
    try:
        return json.loads((list_checkpoints(out_dir)[-1] / "state.json").read_text())
    except (IndexError, OSError, ValueError):
        return {}


def set_aside(out_dir):
    """--overwrite: move the run's files into DIR/.overwritten (a rename, nothing copied).
    Where one is there already, the run now on top is a replacement that stopped before
    its first checkpoint: that one goes, the one set aside before stays."""
    kept = out_dir / OVERWRITTEN
    earlier = kept.exists()
    kept.mkdir(exist_ok=True)
    for name in RUN_FILES:
        path = out_dir / name
        if earlier and path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        elif path.exists():
            os.rename(path, kept / name)


def run_settings(out_dir, unknown_if_damaged=False):
    """A run's settings as last asked: args.json (how it started) with each resume's
    changes (resumes.jsonl) applied in order. unknown_if_damaged: a damaged record is a
    run all the same, whose settings are unknown ({}), not an error."""
    try:
        settings = read_json(out_dir / "args.json")
        if not isinstance(settings, dict):  # valid JSON, but not the flags this script wrote
            raise FinetuneError(f"{out_dir / 'args.json'} is not a run's settings (a JSON "
                                "object of its flags)")
        for line in (read_text(out_dir / "resumes.jsonl").splitlines()
                     if (out_dir / "resumes.jsonl").is_file() else []):
            try:
                settings.update({k: new for k, (_, new) in json.loads(line)["changed"].items()})
            except (ValueError, KeyError, TypeError, AttributeError):
                raise FinetuneError(f"{out_dir / 'resumes.jsonl'} is damaged (a line is not a "
                                    "resume record)") from None
    except FinetuneError:
        if not unknown_if_damaged:
            raise
        return {}
    return settings


def metric_lines(out_dir):
    """metrics.jsonl: a line per epoch, and per evaluation between epoch ends (an unreadable
    file: none)."""
    try:
        return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return []


def epoch_lines(lines):
    """Of metric_lines, those of finished epochs (evaluations between them have no train_loss;
    an epoch the run ended early is `partial`)."""
    return [m for m in lines if "train_loss" in m and not m.get("partial")]


def refuse_finished_resume(args):
    """--resume of a finished run (is_finished): nothing on disk changes."""
    lines = metric_lines(args.resume)
    if is_finished(args.resume, vars(args), lines):
        done, steps = len(epoch_lines(lines)), newest_state(args.resume).get("global_step", 0)
        more = (f"it stopped early at step {lines[-1]['step']:,}; start a new run to train on"
                if any(m.get("stopped_early") for m in lines) else
                f"pass --max-steps {args.max_steps * 2} to train on" if args.max_steps else
                f"pass --epochs {math.floor(args.epochs) + 1} to train on")
        trained = (f"{steps:,} of --max-steps {args.max_steps:,} optimizer steps"
                   if args.max_steps else f"{done} of {args.epochs:g} epochs")
        accuracy = [m["accuracy"] for m in lines if "accuracy" in m][-1:]
        raise NothingToDo(f"{args.resume} holds a finished run ({trained}"
                          + "".join(f", accuracy {a:.3f}" for a in accuracy)
                          + "): nothing to resume; " + more)


def resolve_resume_dir(value, output_dir=None):
    """The run directory --resume names: a directory, 'auto' (of the runs under runs/ with a
    checkpoint, the newest unfinished), or as the Trainer's --resume-from-checkpoint, 'true'
    (--output-dir's run) or a checkpoint (its newest)."""
    if value.lower() == "true" and output_dir:
        value = output_dir
    path = Path(value)
    if value == "auto":
        runs = sorted((d for d in Path("runs").glob("*") if list_checkpoints(d)),
                      key=lambda d: list_checkpoints(d)[-1].stat().st_mtime)
        if not runs:
            raise FinetuneError("--resume auto: no run with a checkpoint under runs/")
        unfinished = [d for d in runs if not is_finished(d)]
        if not unfinished:
            raise NothingToDo(f"--resume auto: every run under runs/ is finished; the newest is "
                              f"{runs[-1]} ({describe_run(runs[-1])})")
        path = unfinished[-1]
    if path.parent.name == "checkpoints" and (path / "state.json").is_file():
        newest = list_checkpoints(path.parent.parent)[-1]
        if newest.name != path.name:
            raise FinetuneError(f"--resume {path}: a run continues from its newest checkpoint, "
                                f"{newest}; to train from this one, pass --model {path} in a "
                                "new --output-dir")
        path = path.parent.parent
    if (path / OVERWRITTEN).is_dir() and not list_checkpoints(path):
        put_back(path)
    finished = (path / "args.json").is_file() and is_finished(path)
    if not finished and (not (path / "args.json").is_file() or not list_checkpoints(path)):
        raise FinetuneError(f"--resume {path}: no checkpoint there (expected args.json "
                            "and checkpoints/step-*)")
    return path


def put_back(out_dir):
    """--resume of a directory whose --overwrite replacement stopped before its first
    checkpoint: the run that was set aside comes back, and the replacement's files go."""
    kept, lock = out_dir / OVERWRITTEN, DirectoryLock(out_dir, print)  # not while one runs
    try:
        for name in RUN_FILES:
            path = out_dir / name
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            if (kept / name).exists():
                os.rename(kept / name, path)
        shutil.rmtree(kept)
    finally:
        lock.release()
    print(f"put back the run that --overwrite had set aside in {kept} ({describe_run(out_dir)})")


# ----------------------------------------------------------------------------
# 9. Loading: one line for what does not load, and the data formats on disk.
# ----------------------------------------------------------------------------

DATA_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
OFFLINE_HINT = ("no network? pass a local copy with --model PATH (a save_pretrained dir) "
                "and --dataset PATH (save_to_disk dir, parquet/csv/json files, or aclImdb)")


def local_path(flag, name, kind):
    """The local `kind` that `name` names, or None for a hub name. A hub-like name that is
    also a local path is taken as the local one, as transformers and datasets do: said."""
    path = Path(name).expanduser()
    # Hub names are 'name' or 'owner/name'; anything else is meant as a local path.
    meant_local = (name.startswith((".", "/", "~")) or name.count("/") > 1
                   or path.suffix in DATA_SUFFIXES)
    if path.exists():
        if not meant_local and int(os.environ.get("RANK", 0)) == 0:
            print(f"note: {flag} {name} is the local {kind} {path.resolve()}, not the hub's "
                  f"{name} (for the hub's, run from a directory without {name})",
                  file=sys.stderr)
        return path
    if meant_local:
        raise FinetuneError(f"{flag} {name}: no such {kind}")
    return None


def read_local_dataset(path):
    """--dataset PATH: the aclImdb folder, a save_to_disk directory, or split files."""
    if not path.is_dir():
        raise FinetuneError(f"--dataset {path}: give the directory holding the split files")
    if not (path / "train" / "pos").is_dir():
        dataset_dict = (path / "dataset_dict.json").exists()
        return load_from_disk(str(path)) if dataset_dict else read_data_files(path)
    splits = {}  # the original Stanford release: <split>/{neg,pos}/<id>_<rating>.txt
    for split in ("train", "test"):
        texts, labels = [], []
        for label, name in enumerate(("neg", "pos")):
            for f in sorted((path / split / name).glob("*.txt")):
                texts.append(read_text(f))
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
    kind = kinds.pop()
    if kind != "parquet":
        for f in (f for fs in by_split.values() for f in fs):
            check_utf8(f)
    return DatasetDict({split: read_files(kind, files, split, root)
                        for split, files in by_split.items()})


@contextlib.contextmanager
def naming_unreadable(kind, files, split, root):
    """datasets wraps the reader's error: show the reader's, and the file it failed on."""
    try:
        yield
    except Exception as exc:
        while exc.__cause__ or exc.__context__:
            exc = exc.__cause__ or exc.__context__
        if "corresponds to no data" in str(exc):
            raise FinetuneError(f"the {split} split is empty ({', '.join(files)})") from None

        def unreadable(data_file):  # read alone: is it the one the reader failed on?
            try:
                read_files(kind, [data_file], split, root)
            except FinetuneError:
                return True
            return False
        culprit = next((f for f in files if len(files) > 1 and unreadable(f)), files[0])
        raise FinetuneError(f"could not read the {split} files in {root}: {Path(culprit).name} "
                            f"({first_line(exc)})") from None


def select_splits(raw, text_column, label_column):
    """Train on 'train', validate on 'test' (as the tutorial); check what users get wrong."""
    if "train" not in raw:
        raise FinetuneError(f"the dataset has no 'train' split (splits: {', '.join(raw)})")
    eval_split = "test" if "test" in raw else "validation" if "validation" in raw else None
    if eval_split is None:
        raise FinetuneError("the dataset has no 'test' or 'validation' split "
                            f"(splits: {', '.join(raw)})")
    splits = {"train": raw["train"], "eval": raw[eval_split]}
    text_columns = text_column.split(",")  # a sentence pair: first,second
    if len(text_columns) > 2:
        raise FinetuneError(f"--text-column {text_column}: one column, or two for sentence pairs "
                            "(first,second)")
    for split, ds in splits.items():
        missing = [c for c in (*text_columns, label_column) if c not in ds.column_names]
        if missing:
            raise FinetuneError(f"column {missing[0]!r} not in the {split} split; its columns are: "
                                f"{', '.join(ds.column_names)} (use --text-column/--label-column)")
        if len(ds) == 0:
            raise FinetuneError(f"the {split} split is empty")
        texts = [name for name, f in ds.features.items() if isinstance(f, datasets.Value)
                 and f.dtype in ("string", "large_string")]
        for column in text_columns:
            if column not in texts:  # the tokenizer takes text only: else it fails mid-map
                feature = ds.features[column]
                kind = feature.dtype if isinstance(feature, datasets.Value) else \
                    type(feature).__name__
                raise FinetuneError(f"--text-column {column}: in the {split} split it holds "
                                    f"{kind}, not text; columns of text: "
                                    + (", ".join(texts) or "none"))
            if ds.data.column(column).null_count or ds.data.column(label_column).null_count:
                raise FinetuneError(f"the {split} split has empty (null) values in "
                                    f"{column!r} or {label_column!r}")
    return splits


def takes_token_types(model, pairs):
    """Whether token type ids (0: first text, 1: second) go to the model: for sentence
    pairs, where it has a table of two types or more (BERT, ELECTRA, ALBERT; RoBERTa's has
    one, DistilBERT and the decoders none)."""
    return pairs and getattr(model.config, "type_vocab_size", 0) >= 2


def encode_labels(splits, label_column, label_names=None):
    """Labels become ids 0..n-1: text labels in sorted order, or in the order of
    --label-names, which must name exactly the labels found; integer labels keep their
    values, and --label-names names them."""
    feature = splits["train"].features[label_column]
    given = label_names.split(",") if label_names else None
    text_labels = False
    if isinstance(feature, ClassLabel):
        names = feature.names
    else:
        values = sorted(set().union(*(ds.unique(label_column) for ds in splits.values())))
        text_labels = all(isinstance(v, str) for v in values)
        if text_labels:
            names = values
        elif all(isinstance(v, int) and v >= 0 for v in values):
            names = [str(i) for i in range(max(values) + 1)]
        else:
            raise FinetuneError(f"labels must be strings or integers >= 0, found {values[:5]}")
    if given and text_labels and sorted(given) != names:
        raise FinetuneError(f"--label-names {label_names}: the data's labels are "
                            f"{','.join(names)}; give exactly these, in the order of their ids")
    if given and len(given) != len(names):
        raise FinetuneError(f"--label-names has {len(given)} names, "
                            f"the data has {len(names)} labels")
    names = given or names
    if len(names) < 2:
        raise FinetuneError(f"the data has a single label ({names[0]}): need at least 2 classes")
    # A label that only the eval split has would make a class the model never trains on,
    # and every review of it a certain miss: refused rather than silently counted.
    unseen = sorted(set(splits["eval"].unique(label_column))
                    - set(splits["train"].unique(label_column)))
    if unseen:
        counts = pyarrow.compute.value_counts(splits["eval"].data.column(label_column)).to_pylist()
        found = {c["values"]: c["counts"] for c in counts}
        described = ", ".join(f"{v if text_labels else names[v]!s} ({found[v]} reviews)"
                              for v in unseen)
        raise FinetuneError(f"the eval split has labels the train split lacks: {described}; "
                            "a model cannot learn a label it never sees: remove those reviews "
                            "or add training examples of them")
    class_label = ClassLabel(names=names)
    for split, ds in splits.items():
        if ds.features[label_column] != class_label:
            if not isinstance(ds.features[label_column], ClassLabel) and given and not text_labels:
                ds = ds.cast_column(label_column, datasets.Value("int64"))
            splits[split] = ds.cast_column(label_column, class_label)
    return names


# What a tokenizer is saved as (save_pretrained writes one or more of them). Without
# any, AutoTokenizer quietly builds one that knows only the special tokens.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")


def check_model_dir(path):
    """Name the damaged or missing file of a model directory, rather than fail (or, for the
    tokenizer, go on silently) inside transformers: checksums where this script wrote
    them, else the files' own structure."""
    if not path.is_dir():
        raise FinetuneError(f"{path} is not a directory")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FinetuneError(f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)}): a model "
                            "directory needs the model and its tokenizer, each saved with "
                            "save_pretrained")
    damaged = damaged_files(path)
    if damaged:
        raise FinetuneError(f"{path / damaged[0]} is damaged: its checksum is not the one "
                            "written with it")
    for f in sorted(path.glob("*.json")):
        read_json(f)
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as exc:  # safetensors reads the header and checks the file's size
            raise FinetuneError(f"{f} is damaged ({first_line(exc)})") from None


def check_tokenizer_fits(name, model, tokenizer):
    """A tokenizer made for another model gives ids beyond the embedding table (an error
    deep in the forward) or maps most words to [UNK] (a run that learns nothing). A model
    without a padding id (decoders) takes the tokenizer's."""
    tokens, table = len(tokenizer), model.get_input_embeddings().num_embeddings
    if tokens > table or tokens < table // 2:
        raise FinetuneError(f"{name}: its tokenizer has {tokens:,} tokens and the model's "
                            f"embedding table {table:,} rows: the tokenizer is not the model's "
                            "(save both with save_pretrained into one directory)")
    if model.config.pad_token_id is None:  # a decoder's head (GPT-2, Llama) finds texts' ends by it
        model.config.pad_token_id = tokenizer.pad_token_id


@contextlib.contextmanager
def loading(what, name):
    """A model or dataset that does not load, as one line naming it; from the hub, with
    how to run without one. The hub client and the loaders raise many kinds of error.
    transformers' warnings are off meanwhile: its load report (a table listing the new
    head's weights as MISSING) reads like an error on every start; say_what_is_new says it."""
    local = Path(name).expanduser().exists()
    if not local:
        reach_hub(what, name)  # seconds, not the hub client's minute of retries
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    except Exception as exc:
        where = f"directory {name}" if local else f"'{name}' from the Hugging Face Hub"
        hint = "" if local else f"; {OFFLINE_HINT}"
        raise FinetuneError(f"could not load {what} {where} ({first_line(exc)}){hint}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def say_what_is_new(model, loaded, say):
    """One line for the new head, which fine-tuning expects; a warning for anything else
    the checkpoint lacked (a missing encoder weight is not expected)."""
    new = sorted(set(loaded["missing_keys"]) |
                 {k if isinstance(k, str) else k[0] for k in loaded["mismatched_keys"]})
    encoder = model.base_model_prefix + "."
    head = sorted({k.split(".")[0] + ".*" for k in new if not k.startswith(encoder)})
    others = [k for k in new if k.startswith(encoder)]
    if head:
        say(f"new classification head: {', '.join(head)} ({model.config.num_labels} labels), "
            "initialised randomly")
    if others:
        say(f"warning: {len(others)} weights of the encoder are not in the checkpoint and were "
            f"initialised randomly: {', '.join(others[:5])}" + (" ..." if len(others) > 5 else ""))


def reach_hub(what, name, timeout=3.0):
    """One connection to the hub first: unreachable, that is one line at once. Skipped in
    offline mode (HF_HUB_OFFLINE), where the libraries read their cache instead."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    from huggingface_hub.constants import ENDPOINT
    from urllib.parse import urlsplit
    url = urlsplit(ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise FinetuneError(f"could not load {what} '{name}' from the Hugging Face Hub (no "
                            f"connection to {url.hostname}:{port}: {exc.strerror or exc}); "
                            f"{OFFLINE_HINT}; for a copy in the Hugging Face cache, set "
                            "HF_HUB_OFFLINE=1") from None


def first_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def check_max_length(max_length, model, tokenizer):
    """Longer than the model takes is an error, not a silent clamp: the length sets the shapes."""
    limit = max_tokens(model, tokenizer)
    if max_length > limit:
        raise FinetuneError(f"--max-length {max_length}: this model takes at most {limit} "
                            "tokens; use that or less")


def max_tokens(model, tokenizer):
    """The longest input the model takes: its position table, or the tokenizer's limit."""
    return min(getattr(model.config, "max_position_embeddings", 10**9),
               tokenizer.model_max_length)


def subset(ds, n, seed):
    """A seeded random subset, so quick runs see a fair mix of labels."""
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def transformer_blocks(model, stages):
    """(name, list) of a classifier's transformer blocks, the first list in its base model:
    encoder.layer (BERT, ELECTRA, RoBERTa, DeBERTa), transformer.layer (DistilBERT), layers
    (ModernBERT, Llama, Qwen, Mistral, Gemma), h (GPT-2)."""
    name, blocks = next(((n, m) for n, m in model.base_model.named_modules()
                         if isinstance(m, torch.nn.ModuleList) and len(m)), (None, None))
    kind = type(model).__name__
    if blocks is None:
        raise FinetuneError(f"cannot find the transformer blocks of {kind} (a list of layers in "
                            "its base model) to place on stages: use --stages 1")
    depth = getattr(model.config, "num_hidden_layers", len(blocks))
    if depth != len(blocks) and stages > 1:  # ALBERT: one layer's weights at every depth
        raise FinetuneError(f"{kind} runs {counted(len(blocks), 'block')} at {depth} depths "
                            "(shared weights), which cannot be spread over pipeline stages: use "
                            "--stages 1 (on IPUs, --ipus 1)")
    return name, blocks


# ----------------------------------------------------------------------------
# 10. The data the loops read: tokenized reviews, or rows of them.
# ----------------------------------------------------------------------------

def choose_padding(args, static):
    """IPU graphs and traced pipelines have fixed shapes. A GPU is fastest with a few
    shapes that CUDA graphs replay (section 20); a CPU with each batch padded to its longest."""
    padding = args.padding if args.padding != "auto" else "max_length" if static else (
        "buckets" if args.device == "cuda" else "dynamic")
    if static and padding in ("dynamic", "buckets"):
        raise FinetuneError(f"--padding {padding} is for CUDA/CPU without pipeline stages: IPU "
                            "graphs and traced pipelines need static shapes")
    if padding == "packed":
        if args.group_by_length == "yes":
            raise FinetuneError("--group-by-length is for --padding dynamic: packing fills "
                                "rows by length itself")
        args.max_per_row = args.max_per_row or PACKED_MAX_PER_ROW
    elif args.max_per_row is not None:
        raise FinetuneError(f"--max-per-row is for --padding packed (this run pads {padding})")
    return padding


class Reviews(torch.utils.data.Dataset):
    """Tokenized reviews as flat arrays: review i's tokens are input_ids[starts[i]:starts[i + 1]].

    The tutorial ends with ds.set_format("torch"), so that each row comes out of
    the dataset as tensors. Here the columns are read out of Arrow once instead: a
    batch is then a few slices, not a conversion per row, and no datasets formatter
    runs (datasets 4.0's torch and numpy formatters import torchvision's
    VideoReader, which current torchvision no longer has).
    """

    def __init__(self, ds):
        table = ds.with_format("arrow")[:]

        def flat(column):
            return pyarrow.compute.list_flatten(table.column(column)).to_numpy().astype(np.int64)
        self.input_ids, self.attention_mask = flat("input_ids"), flat("attention_mask")
        self.token_type_ids = flat("token_type_ids") if "token_type_ids" in ds.column_names \
            else None  # sentence pairs
        self.lengths = table.column("length").to_numpy()
        row_lengths = pyarrow.compute.list_value_length(table.column("input_ids")).to_numpy()
        self.starts = np.concatenate([[0], np.cumsum(row_lengths)])
        self.labels = table.column("labels").to_numpy().astype(np.int64)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        tokens = slice(self.starts[i], self.starts[i + 1])
        pair = {} if self.token_type_ids is None else {
            "token_type_ids": torch.from_numpy(self.token_type_ids[tokens])}
        return {"input_ids": torch.from_numpy(self.input_ids[tokens]),
                "attention_mask": torch.from_numpy(self.attention_mask[tokens]), **pair,
                "labels": torch.tensor(self.labels[i])}


class Data:
    """The tokenized splits, and what the loops need to know of them.

    With --padding packed (section 11) the loaders read rows of packed reviews
    instead of the reviews themselves, and the model reads them through a
    PackedClassifier: the methods below give each flow the one or the other.
    """

    def __init__(self, train, eval_ds, pad_id, packing=None):
        self.train, self.train_lengths = train, train.lengths.tolist()
        self.eval, self.eval_lengths = eval_ds, eval_ds.lengths.tolist()
        self.eval_labels = eval_ds.labels
        self.token_types = train.token_type_ids is not None  # sentence pairs, where taken
        self.pad_id, self.packing = pad_id, packing
        self.unit = "row" if packing else "sample"  # what a loader's sample is
        self.train_set = train  # what the training loader indexes
        self.rows_per_epoch = None  # packed: the same row count every epoch

    def require_train(self, needed, what):
        if len(self.train) < needed:
            raise FinetuneError(f"the train split has {len(self.train)} samples, fewer than "
                                f"{what} ({needed}): use more data or a smaller batch")

    def train_dataset(self, step_rows, micro_batches, multiple):
        """What the training loader reads: the reviews (the tutorial), or with --padding packed
        rows of them, `multiple` rows at a time, `step_rows` per optimizer step."""
        if self.packing:
            self.rows_per_epoch = self.packing.rows_per_epoch(self.train_lengths, multiple)
            self.train_set = PackedRows(self.train, self.packing.max_length, self.packing.per_row,
                                        self.pad_id, step_rows, micro_batches)
            self.pack_epoch(0)  # rows for compiling and tracing; each epoch packs its own
        return self.train_set

    def pack_epoch(self, epoch):
        """--padding packed: this epoch's rows. Else nothing: the loader shuffles the reviews."""
        if self.packing:
            self.train_set.use(self.packing.train_rows(self.train_lengths, epoch,
                                                       self.rows_per_epoch))

    def train_batches(self, step_size, seed, epoch, group_by_length):
        """The epoch's optimizer steps as lists of train_set indices."""
        if self.packing:  # the rows are already shuffled and in step order
            return batches_in_order(len(self.train_set), step_size)
        return train_batches(self.train_lengths, step_size, seed, epoch, group_by_length)

    def samples_in_rows(self, indices):
        return sum(len(self.train_set.rows[i]) for i in indices) if self.packing else len(indices)

    def eval_dataset(self, multiple):
        """The eval set in whole batches of `multiple` rows (static shapes), and the review
        each row (unpacked) or each slot (packed) predicts, -1 for none."""
        if self.packing:
            rows = self.packing.eval_rows(self.eval_lengths, multiple)
            slots = np.array([row + [-1] * (self.packing.per_row - len(row)) for row in rows])
            return PackedRows(self.eval, self.packing.max_length, self.packing.per_row,
                              self.pad_id, len(rows), 1).use(rows), slots
        n = len(self.eval)  # padded with repeats of review 0 to whole batches
        indices = list(range(n)) + [0] * (-n % multiple)
        return torch.utils.data.Subset(self.eval, indices), np.array(indices)

    def classifier(self, model):
        """The model the flows call: itself, or for packed rows a PackedClassifier around it."""
        return PackedClassifier(model, self.packing.per_row) if self.packing else model

    def efficiency(self, packed=True):
        """Packed: text tokens / row tokens in training, as packed or as padded to max_length."""
        rows = len(self.train_set) if packed else len(self.train)
        return sum(self.train_lengths) / (rows * self.packing.max_length)


def samples_in(batch):
    """Reviews in a batch: one per row, or per filled slot of packed rows."""
    return int((batch["labels"] != -100).sum())


# ----------------------------------------------------------------------------
# 11. Packing: several reviews in one row of --max-length tokens.
#
# IPU graphs and traced pipelines take rows of exactly --max-length tokens, and
# an IMDB review is 275 of 512 tokens on average: padded to max_length, almost
# half of every step computes padding. Packing (Krell et al. 2021, "Efficient
# Sequence Packing without Cross-contamination"; Graphcore's PackedBERT) puts
# several reviews into one row instead, and keeps each exactly as if alone:
#   - a token attends only to its own review's tokens (a block-diagonal mask);
#   - position ids restart at 0 with each review;
#   - each review is classified from its own first token ([CLS]);
#   - the loss is the mean over the optimizer step's reviews.
# A packed row's attention_mask says which review each token belongs to (1, 2,
# ...; 0 is padding), as in PackedBERT, and the row has --max-per-row slots for
# its reviews' labels. The flows are the same: the batches and the model that
# reads them differ.
# ----------------------------------------------------------------------------

PACKING_WINDOW = 1000   # reviews packed together: enough to fill rows, still shuffled
# Every epoch has the same row count: the most that the first few epochs' packings need
# (an epoch that needs more is shuffled anew). A fixed number of epochs, not --epochs,
# which a resume may change: an epoch's rows must not depend on it.
ROW_COUNT_EPOCHS = 3
PACKABLE_MODELS = ("ElectraForSequenceClassification", "BertForSequenceClassification",
                   "RobertaForSequenceClassification", "XLMRobertaForSequenceClassification",
                   "DebertaV2ForSequenceClassification")
# 4.x: DistilBERT's model takes no position ids, ALBERT's no 3D mask, and the decoders'
# no 4D mask (GPT-2) or a causal one they build from a 2D mask only
PACKABLE_WITH_TRANSFORMERS_5 = (
    "DistilBertForSequenceClassification", "AlbertForSequenceClassification",
    "ModernBertForSequenceClassification", "LlamaForSequenceClassification",
    "GPT2ForSequenceClassification", "Qwen2ForSequenceClassification",
    "MistralForSequenceClassification", "GemmaForSequenceClassification")
if TRANSFORMERS_VERSION >= (5, 0):
    PACKABLE_MODELS += PACKABLE_WITH_TRANSFORMERS_5


def packing_for(args, model, padding):
    """--padding packed: how this run packs reviews into rows (None otherwise)."""
    if padding != "packed":
        return None
    kind, window = type(model).__name__, getattr(model.config, "sliding_window", None)
    if kind not in PACKABLE_MODELS and kind in PACKABLE_WITH_TRANSFORMERS_5:
        raise FinetuneError(f"--padding packed: {kind} packs with transformers 5 (this is "
                            f"{transformers.__version__}): use --padding max_length")
    if kind not in PACKABLE_MODELS:
        raise FinetuneError(f"--padding packed knows the heads of {', '.join(PACKABLE_MODELS)}, "
                            f"not {kind}: use --padding max_length")
    # A decoder's packed row has no band for its window (ModernBERT's has: packed_attention).
    if window and window < args.max_length and kind != "ModernBertForSequenceClassification":
        raise FinetuneError(f"--padding packed: {kind} attends within a window of {window} "
                            f"tokens, fewer than --max-length {args.max_length}; use "
                            f"--max-length {window} or --padding max_length")
    if getattr(model.config, "conv_kernel_size", 0):  # DeBERTa-v2's, after its first block
        raise FinetuneError(f"--padding packed: {kind} mixes neighbouring tokens by a "
                            "convolution (conv_kernel_size), across the reviews of a row; use "
                            "--padding max_length")
    return Packing(args.max_length, args.max_per_row, args.seed)


def pack_rows(lengths, order, max_length, per_row):
    """Best-fit decreasing: longest review first, into the open row it fills most tightly."""
    rows, open_by_free = [], [[] for _ in range(max_length + 1)]
    for sample in sorted(order, key=lambda i: -lengths[i]):
        need = lengths[sample]
        free = next((f for f in range(need, max_length + 1) if open_by_free[f]), None)
        if free is None:
            row, free = len(rows), max_length
            rows.append([])
        else:
            row = open_by_free[free].pop()
        rows[row].append(sample)
        if len(rows[row]) < per_row:
            open_by_free[free - need].append(row)
    return rows


def spread_rows(rows, count):
    """Exactly `count` rows, for whole batches: reviews split off shared rows first,
    empty rows only when there are fewer reviews than rows."""
    rows = [list(row) for row in rows]
    for row in rows[:]:
        while len(row) > 1 and len(rows) < count:
            rows.append([row.pop()])
    return rows + [[] for _ in range(count - len(rows))]


def round_up(n, multiple):
    return -(-n // multiple) * multiple


class Packing:
    """Which reviews share each row: deterministic for a seed and an epoch, whatever the
    run's length, and reshuffled every epoch."""

    def __init__(self, max_length, per_row, seed):
        self.max_length, self.per_row, self.seed = max_length, per_row, seed

    def train_rows(self, lengths, epoch, count=None):
        """The epoch's rows: reviews shuffled, packed window by window, the rows shuffled;
        `count` rows, shuffled anew while a packing needs more."""
        for draw in range(100):  # each draw needs more than `count` with p < 1/2
            rng = np.random.default_rng([self.seed, epoch] + ([draw] if draw else []))
            order = rng.permutation(len(lengths)).tolist()
            rows = [row for start in range(0, len(order), PACKING_WINDOW)
                    for row in pack_rows(lengths, order[start:start + PACKING_WINDOW],
                                         self.max_length, self.per_row)]
            if count is None or len(rows) <= count:
                break
        else:
            raise RuntimeError(f"100 packings of epoch {epoch} all need more than {count} rows")
        rows = spread_rows(rows, count) if count else rows
        return [rows[i] for i in rng.permutation(len(rows))]

    def rows_per_epoch(self, lengths, multiple):
        """One row count for every epoch, in whole batches: the loaders, the bar and the
        step count stay the same each epoch."""
        return max(round_up(len(self.train_rows(lengths, epoch)), multiple)
                   for epoch in range(ROW_COUNT_EPOCHS))

    def eval_rows(self, lengths, multiple):
        """The eval reviews packed once (their order does not matter), in whole batches."""
        rows = pack_rows(lengths, range(len(lengths)), self.max_length, self.per_row)
        return spread_rows(rows, round_up(len(rows), multiple))


class PackedRows(torch.utils.data.Dataset):
    """Rows of packed reviews as the model reads them, built when the loader asks.

    The rows come in step order (consecutive `step_rows` rows make one optimizer
    step), so each review's loss weight can make the step's loss the mean over
    its reviews: the weight is the number of micro-batches the step's gradients
    are averaged over (accumulation x replicas) divided by the step's reviews.
    """

    def __init__(self, reviews, max_length, per_row, pad_id, step_rows, micro_batches):
        self.reviews, self.pad_id = reviews, pad_id
        self.max_length, self.per_row = max_length, per_row
        self.step_rows, self.micro_batches = step_rows, micro_batches
        self.rows, self.weights = [], []

    def use(self, rows):
        """Read these rows from now on (an epoch's packing), in optimizer-step order."""
        step_reviews = [sum(map(len, rows[i:i + self.step_rows]))
                        for i in range(0, len(rows), self.step_rows)]
        self.rows = rows
        # A step without reviews (fewer reviews than rows) has no loss to weigh.
        self.weights = [self.micro_batches / max(step_reviews[i // self.step_rows], 1)
                        for i in range(len(rows))]
        return self

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        input_ids = torch.full((self.max_length,), self.pad_id, dtype=torch.long)
        review_of_token = torch.zeros(self.max_length, dtype=torch.long)
        position_ids = torch.zeros(self.max_length, dtype=torch.long)
        labels = torch.full((self.per_row,), -100, dtype=torch.long)  # -100: an empty slot
        loss_weights = torch.zeros(self.per_row)
        pairs = {"token_type_ids": torch.zeros(self.max_length, dtype=torch.long)} \
            if getattr(self.reviews, "token_type_ids", None) is not None else {}  # pairs: 0, 1
        start = 0
        for slot, sample in enumerate(self.rows[i]):
            review = self.reviews[sample]
            end = start + len(review["input_ids"])
            input_ids[start:end] = review["input_ids"]
            review_of_token[start:end] = slot + 1
            # Positions restart with each review. Made here, on the host, as PackedBERT
            # does: on the device they would take a cumsum over integers, which PopTorch
            # turns into a float convolution with a kernel as long as the row.
            position_ids[start:end] = torch.arange(end - start)
            labels[slot], loss_weights[slot] = review["labels"], self.weights[i]
            for name, values in pairs.items():
                values[start:end] = review[name]
            start = end
        return {"input_ids": input_ids, "attention_mask": review_of_token, **pairs,
                "position_ids": position_ids, "labels": labels, "loss_weights": loss_weights}


# transformers 5 takes a 4D additive mask as given; 4.x (the IPU host's) takes a
# 3D 0/1 mask and makes the 4D one itself. Either way it is block-diagonal. DeBERTa's
# blocks take 0/1 in both (an additive mask would be silently wrong there).
ADDITIVE_4D_MASK = TRANSFORMERS_VERSION >= (5, 0)


def first_position(model):
    """The position id of a text's first token: RoBERTa and XLM-R count from after their
    padding index (their own ids come from an integer cumsum); None: from 0."""
    embeddings = getattr(getattr(model, "base_model", None), "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    return None if padding_idx is None else padding_idx + 1


def packed_attention(review_of_token, position_ids, per_row, dtype, read="first", window=None,
                     additive=ADDITIVE_4D_MASK):
    """From a packed attention_mask and its position ids: the block-diagonal attention
    mask, and for each slot a row of weights over the tokens its head reads: its review's
    first, a decoder's last (`read`: "last"; its mask causal too), or all its tokens'
    mean ("mean"); an empty slot's are all zero. window: ModernBERT's sliding layers
    attend within it: their mask has that band too (a dict, as its model takes one).
    additive: the mask as a float to add (4D), else as 0/1 (3D).

    Comparisons only, ops that PopTorch compiles (no eye, no cumsum; the positions
    come from the host), as in PackedBERT. A token attends to the tokens of its own
    review; padding (0) attends to padding, so that no row of the mask is empty. The
    weights pick the tokens by a matmul: exact (x 1 and + 0), and a float tensor,
    which a pipeline can pass from stage to stage with the gradients."""
    allowed = review_of_token[:, :, None] == review_of_token[:, None, :]
    index = torch.arange(allowed.shape[-1], device=allowed.device)
    read_token = position_ids == 0
    if read == "last":  # a decoder's token sees its review up to itself, its head the last
        allowed = allowed & (index[None, :] <= index[:, None])
        read_token = review_of_token != torch.nn.functional.pad(review_of_token[:, 1:], (0, 1))
    slots = torch.arange(1, per_row + 1, device=review_of_token.device)
    in_slot = review_of_token[:, None, :] == slots[None, :, None]  # rows, slots, tokens
    if read == "mean":
        weights = in_slot.to(dtype) / in_slot.sum(-1, keepdim=True).clamp(min=1)
    else:
        weights = (in_slot & read_token[:, None, :]).to(dtype)

    def as_mask(allowed):
        if not additive:
            return allowed.long()
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]
    if window is None:
        return as_mask(allowed), weights
    band = (index[:, None] - index[None, :]).abs() <= window
    return {"full_attention": as_mask(allowed), "sliding_attention": as_mask(allowed & band)}, \
        weights


class PackedClassifier(torch.nn.Module):
    """A classifier of packed rows, called as the Hugging Face model is: logits and
    labels have a slot dimension (rows, --max-per-row, ...)."""

    def __init__(self, model, per_row):
        super().__init__()
        self.model, self.per_row = model, per_row
        self.causal = hasattr(model, "score")  # the decoders' head (Llama, GPT-2, Qwen ...)
        # What the head reads of each review: its first token, a decoder's last, or (as
        # ModernBERT may) the mean of its tokens; ModernBERT's sliding layers, a window.
        modernbert = type(model).__name__ == "ModernBertForSequenceClassification"
        self.read = "last" if self.causal else "mean" if getattr(
            model.config, "classifier_pooling", None) == "mean" else "first"
        self.window = model.config.sliding_window if modernbert else None
        self.first_position = first_position(model) or 0  # RoBERTa's: after its padding index
        # DeBERTa's model multiplies its embeddings by a 2D mask: the blocks take the packed one
        self.deberta = model.config.model_type == "deberta-v2"

    def forward(self, input_ids, attention_mask, position_ids, labels=None, loss_weights=None,
                token_type_ids=None):
        # The token embeddings first: a traced torchrun pipeline stage (torch 2.13) takes
        # its inputs in the order its graph first uses them, and that must be forward's.
        embedded = self.model.get_input_embeddings()(input_ids)
        mask, first_token = packed_attention(attention_mask, position_ids, self.per_row,
                                             self.model.dtype, self.read, self.window,
                                             ADDITIVE_4D_MASK and not self.deberta)
        base = self.model.base_model
        if self.deberta:
            hidden = base.encoder(base.embeddings(
                token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=embedded,
                mask=attention_mask > 0), mask)[0]
        else:
            given = {"token_type_ids": token_type_ids, "use_cache": False if self.causal else None}
            hidden = base(inputs_embeds=embedded, attention_mask=mask,
                          position_ids=position_ids + self.first_position,
                          **{k: v for k, v in given.items() if v is not None})[0]
        firsts = first_token @ hidden  # rows, slots, hidden
        # The model's own head, given the token it reads of each review as a text of one token.
        logits = self.head(firsts.flatten(0, 1)[:, None]).view(*firsts.shape[:2], -1)
        loss = None if labels is None else self.loss(logits, labels, loss_weights)
        return transformers.modeling_outputs.SequenceClassifierOutput(loss=loss, logits=logits)

    def head(self, first_token):
        model, kind = self.model, type(self.model).__name__
        if kind in ("BertForSequenceClassification", "DebertaV2ForSequenceClassification"):
            pooler = getattr(model, "pooler", None) or model.base_model.pooler  # DeBERTa's: top
            return model.classifier(model.dropout(pooler(first_token)))
        if kind == "AlbertForSequenceClassification":
            return model.classifier(model.dropout(model.albert.pooler_activation(
                model.albert.pooler(first_token[:, 0]))))
        if kind == "DistilBertForSequenceClassification":
            return model.classifier(model.dropout(torch.relu(model.pre_classifier(
                first_token[:, 0]))))
        if self.causal:
            return model.score(first_token[:, 0])
        if kind == "ModernBertForSequenceClassification":
            return model.classifier(model.drop(model.head(first_token[:, 0])))
        return model.classifier(first_token)  # ELECTRA's and RoBERTa's heads read the first token

    @staticmethod
    def loss(logits, labels, loss_weights):
        """The step's mean over its reviews: each review's loss times its weight (PackedRows)."""
        per_review = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                       ignore_index=-100, reduction="none")
        return (per_review * loss_weights.flatten()).sum()


# ----------------------------------------------------------------------------
# 12. The optimizer: AdamW's weight-decay groups, the lr schedule, clipping,
#     loss scaling.
#
# What the Trainer's TrainingArguments control, for both flows: an IPU applies the
# same update on the device (PopTorch's AdamW), the CUDA/CPU flow through
# OptimizerStep.
# ----------------------------------------------------------------------------

def adamw(params, lr, device, weight_decay=0.01):
    """torch's AdamW, with the fused kernel where this torch has it.

    The fused kernel updates all weights in one pass: on CPU it takes a fifth of
    the time of the default (foreach) one, for the same update. CPU has it since
    torch 2.4; the IPU host's torch 2.0.1 has it on CUDA only.
    """
    cuda = device.type == "cuda"
    fused = cuda or TORCH_VERSION >= (2, 4)
    # capturable: its step counts (and on CUDA its lr) live on the GPU, so the step can be
    # captured in a CUDA graph that reads the schedule's lr at each replay.
    tensor_lr = cuda and TORCH_VERSION >= (2, 2)  # fused AdamW reads a tensor lr since 2.2
    return torch.optim.AdamW(params, lr=torch.tensor(lr, device=device) if tensor_lr else lr,
                             weight_decay=weight_decay, fused=fused or None, capturable=cuda)


def decay_groups(model, weight_decay, parameters=None):
    """AdamW's parameter groups, as HF's Trainer makes them: weight decay on the weights,
    none on the model's biases and LayerNorm weights. parameters: (name, parameter) pairs
    named as in `model`, where only some are trained here (a pipeline stage's)."""
    norms = {name for name, module in model.named_modules()
             if isinstance(module, torch.nn.LayerNorm)}
    no_decay = {name for name, _ in model.named_parameters()
                if name.endswith("bias") or name.rpartition(".")[0] in norms}
    decay, rest = [], []
    for name, param in parameters or model.named_parameters():
        if param.requires_grad:
            (rest if name in no_decay else decay).append(param)
    return [group for group in ({"params": decay, "weight_decay": weight_decay},
                                {"params": rest, "weight_decay": 0.0}) if group["params"]]


def set_lr(optimizer, lr):
    """Every group's lr; a tensor lr (CUDA) is written in place, where a graph reads it."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class Schedule:
    """The lr of each optimizer step, as the Trainer's schedules: a linear warm-up from 0
    over the warm-up steps, then constant (the tutorial's), or a linear or cosine decay
    that reaches 0 after the last step. It depends on the step alone, so a checkpoint's
    step count is the schedule's position."""

    def __init__(self, args, total_steps):
        self.lr, self.kind, self.total = args.lr, args.lr_scheduler_type, total_steps
        steps = args.warmup_steps  # below 1, as in transformers 5, a ratio of all steps
        self.warmup = int(steps) if steps >= 1 else math.ceil((steps or args.warmup_ratio)
                                                              * total_steps)
        self.current = args.lr  # what the optimizer was built with

    def lr_at(self, step):
        """The lr of optimizer step `step`, counted from 0."""
        if step < self.warmup:
            return self.lr * step / self.warmup
        if self.kind == "constant":
            return self.lr
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.kind == "linear":
            return self.lr * max(0.0, 1 - progress)
        return self.lr * max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))

    def update(self, optimizer, step):
        """Give the optimizer step `step`'s lr; whether it changed (an IPU needs to know)."""
        lr = self.lr_at(step)
        if lr == self.current:
            return False
        set_lr(optimizer, lr)
        self.current = lr
        return True

    def describe(self):
        if self.kind == "constant" and not self.warmup:
            return f"constant, lr {self.lr:g}"
        warmup = f", warm-up {counted(self.warmup, 'step')} from 0" if self.warmup else ""
        return f"{self.kind}{warmup}, peak lr {self.lr:g}"


def ipu_adamw(wrapped, args):
    """PopTorch's AdamW, as the tutorial's, with the weights grouped for weight decay (none
    on biases and LayerNorm weights). An attribute given explicitly here is variable: the
    host can change it later with setOptimizer, without recompiling (the lr schedule does);
    one left out is a constant of the graph. Clipping, if asked, runs on the device."""
    clipping = {"max_grad_norm": args.max_grad_norm} if args.max_grad_norm else {}
    return poptorch.optim.AdamW(decay_groups(wrapped, args.weight_decay), lr=args.lr,
                                weight_decay=args.weight_decay, **clipping)


class OptimizerStep:
    """The optimizer step after a backward: the gradients unscaled (--fp16) and clipped
    (--max-grad-norm), then the update, skipped on the device when the step's loss is
    not finite, or (--fp16) a gradient overflowed.

    --fp16: float16's dynamic loss scaling, as torch's GradScaler does it, on the device:
    the loss is multiplied by the scale before backward (scaled), so that small gradients
    do not underflow float16; a step whose gradients overflowed is skipped and the scale
    halved; after 2,000 steps without overflow it doubles.

    The host never waits for a loss to decide (a GPU would sit idle meanwhile):
    the fused AdamW takes a `found_inf` flag, as GradScaler uses it, and then
    leaves weights and moments as they were. With --on-nan stop, every later step
    is skipped too, until the host reads the losses (every --log-every steps),
    stops and saves the last good weights. Without the fused kernel (torch < 2.4
    on CPU) the host reads the flag: a sync, but a free one on a CPU.
    """

    def __init__(self, optimizer, args, device, loss_scaling=False, norm_group=None):
        self.optimizer, self.sticky = optimizer, args.on_nan == "stop"
        self.max_norm, self.norm_group = args.max_grad_norm, norm_group
        self.scale = torch.full((), 2.0 ** 16, device=device) if loss_scaling else None
        self.good_steps = torch.zeros((), dtype=torch.int32, device=device)
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.fused = bool(optimizer.defaults.get("fused"))
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def step(self, loss, apply=True):
        skip = ~torch.isfinite(loss) if apply else torch.ones_like(self.bad)  # warm-up: no update
        if self.sticky and apply:
            skip = skip | self.bad
            self.bad.copy_(skip)
        if self.scale is not None:  # the gradients unscaled; a flag (1.0) where one overflowed
            overflow = torch.zeros((), device=self.scale.device)
            torch._amp_foreach_non_finite_check_and_unscale_(
                [p.grad for p in self.params if p.grad is not None], overflow,
                self.scale.reciprocal())
            if apply:
                torch._amp_update_scale_(self.scale, self.good_steps, overflow, 2.0, 0.5, 2000)
            skip = skip | overflow.bool()
        if self.max_norm:
            self.clip()
        if self.fused:
            self.optimizer.found_inf = skip.float()
            self.optimizer.step()
            del self.optimizer.found_inf
        elif not skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def scaled(self, loss):  # what backward starts from
        return loss if self.scale is None else loss * self.scale

    def clip(self):
        """torch's clip_grad_norm_; a pipeline stage's gradients are a part of the model's,
        so there the norm adds up every stage's (one all-reduce over the pipeline's group)."""
        if self.norm_group is None:
            return torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        grads = [p.grad for p in self.params if p.grad is not None]
        squares = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2)), 2) ** 2
        dist.all_reduce(squares, group=self.norm_group)
        total = squares.sqrt()
        torch._foreach_mul_(grads, (self.max_norm / (total + 1e-6)).clamp(max=1.0))
        return total


# ----------------------------------------------------------------------------
# 13. A run: its state, its steps and epochs counted.
#
# Every flow reports its steps and epochs to a Run, which keeps three parts,
# each with one job: the run's state (plain data that a checkpoint saves and
# --resume loads as is), Progress (what the user sees, section 14) and
# Checkpoints (what is saved, when, and --resume: section 16). The Run counts
# steps, epochs and their metrics into them, and stops the run on a non-finite
# loss or a stop request (Ctrl-C, SIGTERM: section 15).
# ----------------------------------------------------------------------------

def new_state():
    """Where a run is and its running sums: what it needs to continue, saved as JSON. The
    lr schedule's position is the step count (Schedule)."""
    return {"epoch": 0, "step": 0, "global_step": 0, "batches": None,
            "loss_sum": 0.0, "loss_steps": 0, "interval_sum": 0.0, "interval_steps": 0,
            "train_samples": 0, "train_seconds": 0.0, "skipped_steps": 0,
            "metrics": [], "loss_curve": [], "evaluations": [], "best": None, "since_best": 0}


class Run:
    """One fine-tuning run, counted the same for the IPU and the CUDA/CPU flow."""

    def __init__(self, args, out_dir, ranks, data, padding, tokenizer, say):
        self.args, self.out_dir, self.ranks, self.data, self.say = args, out_dir, ranks, data, say
        self.padding = padding  # how batches are padded: section 10
        self.state = new_state()  # one dict, shared with the parts
        self.progress = Progress(args, ranks, data, padding, out_dir, self.state, say)
        self.stop = StopRequest()  # Ctrl-C, SIGTERM end the run cleanly (section 15)
        self.checkpoints = Checkpoints(args, out_dir, ranks, tokenizer, self.state, self.stop, say)
        self.evaluations = Evaluations(args, self.state, self.checkpoints, self.progress)
        self.plan = self.schedule = self.evaluate = None  # from start()
        self.last = self.epoch_start = time.perf_counter()

    def start(self, model, steps_per_epoch, evaluate, multiple=1, warmup_seconds=0.0, **summary):
        """The step plan, the lr schedule, the summary, the bar; then a stop request waits.
        evaluate: the flow's, for --eval-steps; warmup_seconds: capturing CUDA graphs."""
        self.evaluate, self.warmup_seconds = evaluate, warmup_seconds
        self.state["train_seconds"] += warmup_seconds
        self.plan = StepPlan(self.args, steps_per_epoch, multiple)
        self.state["steps_per_epoch"] = steps_per_epoch  # is_finished reads it
        self.schedule = Schedule(self.args, self.plan.total)
        self.progress.start(model, self.plan, self.schedule, **summary)
        self.stop.install()

    def epochs(self):  # from where a resumed run stopped
        for epoch in range(self.state["epoch"], self.plan.epochs):
            self.epoch_start = self.last = time.perf_counter()
            yield epoch

    def reading_due(self, pending):
        """Whether the host must read the pending losses now: for a reading, a checkpoint,
        an evaluation, or (one process) a stop request."""
        step, plan = self.state["global_step"] + pending, self.plan
        return (step % plan.log_every == 0 or plan.saves(step) or plan.evaluates(step)
                or (not self.ranks.enabled and self.stop.signal is not None))

    def steps_done(self, losses, samples, updates_applied=False):
        """Count optimizer steps, each with its loss, evaluating and checkpointing between
        them where the plan says; `updates_applied`: an IPU had applied them already, so a
        non-finite loss cannot be skipped. An epoch's end is end_epoch's."""
        state, now = self.state, time.perf_counter()  # the steps and loading their batches
        state["train_seconds"] += now - self.last
        state["train_samples"] += samples
        self.last = now
        for loss in losses:
            if not math.isfinite(loss):
                loss = non_finite_loss(self, loss, updates_applied)
            state["step"] += 1
            state["global_step"] += 1
            self.progress.step_done(loss)
            step = state["global_step"]
            if self.plan.ends_epoch(step):
                continue
            if self.plan.evaluates_mid_epoch(step):  # before a checkpoint: it holds the result
                self.evaluations.mid_epoch(self.evaluate)
                self.progress.write_results()  # on disk at once: a kill does not lose it
                self.last = time.perf_counter()  # evaluating is not training time
            if self.checkpoints.mid_epoch and self.plan.saves(step):
                self.checkpoints.save()
                self.last = time.perf_counter()
        if self.stop.requested(self.ranks):
            raise Interrupted(self.stop.signal)

    def end_epoch(self, evaluate):
        """The end of an epoch, or of the run where --max-steps ends one early: the
        evaluation --eval-strategy asks for (the flow's `evaluate`), the line (the tutorial's
        "Accuracy:" first), the results and a checkpoint.

        A run that --max-steps ends mid-epoch is paused there, as a stop pauses it: its
        checkpoint holds the state a larger --max-steps goes on from, exactly the unbroken
        run's. What it reports beyond that (the epoch's partial line, with the evaluation
        the epoch strategy makes at a run's end) is written to the files only."""
        state, step = self.state, self.state["global_step"]
        figures, eval_seconds = evaluate() if self.plan.evaluates(step) else ({}, 0)
        complete = state["step"] == self.plan.per_epoch
        recorded = figures and (complete or self.plan.evaluates_mid_epoch(step))
        if recorded:
            self.evaluations.record(figures, eval_seconds)
        if complete:
            state["loss_curve"] += self.progress.interval_reading()  # its last steps, however few
        line = epoch_metrics(state, self.data, self.args, figures, eval_seconds,
                             time.perf_counter() - self.epoch_start, self.warmup_seconds,
                             self.schedule)
        self.warmup_seconds = 0.0  # counted in this epoch's time only
        self.progress.epoch_line(line, state["step"])
        if complete:
            state["metrics"].append(line)
            state.update(epoch=state["epoch"] + 1, step=0, batches=None, loss_sum=0.0,
                         loss_steps=0, train_samples=0, train_seconds=0.0, skipped_steps=0)
        self.progress.write_results(extra=[] if complete else [dict(line, partial=True)])
        if self.checkpoints.held:
            self.checkpoints.save()
        if recorded:
            self.evaluations.stop_if_no_better()

    def close(self, stopping=False):
        self.progress.close()
        self.stop.restore(stopping)


def non_finite_loss(run, value, updates_applied):
    """Stop (saving the last good weights where the host has them) or skip the step."""
    where = f"epoch {run.state['epoch'] + 1}, step {run.state['step'] + 1}"
    if run.args.on_nan == "skip" and not updates_applied:
        if run.ranks.is_main:
            tqdm.write(f"warning: loss {value} at {where}: step skipped")
        run.state["skipped_steps"] += 1
        return None
    if updates_applied:  # an IPU applied the step already: the weights are not good
        raise FinetuneError(f"the loss became {value} at {where} (the IPU had already applied "
                            f"that step); last checkpoint: {run.checkpoints.newest()}. "
                            "Lower --lr")
    saved = (f"; kept the last good weights in {run.checkpoints.save()}"
             if run.checkpoints.mid_epoch else "")
    raise FinetuneError(f"the loss became {value} at {where}{saved}. "
                        "Lower --lr, or pass --on-nan skip")


def epoch_metrics(state, data, args, figures, eval_seconds, seconds, warmup_seconds, schedule):
    """One line of metrics.jsonl: the epoch's figures, from the run's sums."""
    return {
        "epoch": state["epoch"] + 1,
        "step": state["global_step"],
        "train_loss": state["loss_sum"] / max(state["loss_steps"], 1),
        **figures,  # accuracy, f1, eval_loss (none where --eval-strategy did not evaluate)
        "lr": schedule.lr_at(state["global_step"] - 1),
        "train_samples_per_s": state["train_samples"] / state["train_seconds"],
        **({"eval_samples_per_s": len(data.eval) / eval_seconds} if figures else {}),
        "samples_per_step": state["train_samples"] / max(state["step"], 1),
        **({"packing_efficiency": data.efficiency()} if data.packing else {}),
        "seconds": seconds,
        "skipped_steps": state["skipped_steps"],
        "warmup_seconds": warmup_seconds,
        **({"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
           if args.device == "cuda" else {}),
    }


class StepPlan:
    """How many optimizer steps a run takes (--epochs, or --max-steps), in how many epochs,
    and the one cadence of the run, in steps: when it reads the losses (--log-every),
    checkpoints (--save-every) and evaluates (--eval-strategy, --eval-steps).
    multiple: the steps of one IPU host call, which ratios are rounded up to."""

    def __init__(self, args, steps_per_epoch, multiple=1):
        self.per_epoch, self.multiple = steps_per_epoch, multiple
        self.total = args.max_steps or round_up(math.ceil(args.epochs * steps_per_epoch),
                                                multiple)
        self.epochs = -(-self.total // steps_per_epoch)
        self.log_every, self.save_every, self.eval_steps = (
            self.steps(value) for value in (args.log_every, args.save_every, args.eval_steps))
        self.eval_at_epoch_ends = args.eval_strategy == "epoch"

    def steps(self, value):
        """A step count, or (below 1) as in the Trainer a ratio of all steps, rounded up."""
        return value if not value or value >= 1 else round_up(math.ceil(value * self.total),
                                                              self.multiple)

    def in_epoch(self, epoch):
        return min(self.per_epoch, self.total - epoch * self.per_epoch)

    def ends_epoch(self, step):
        """Whether `step` ends an epoch, or the run (a --max-steps may end one early)."""
        return step % self.per_epoch == 0 or step == self.total

    def evaluates(self, step):
        """Whether the run evaluates once `step` steps are done: at epoch ends with
        --eval-strategy epoch (the tutorial's), and every --eval-steps steps."""
        return (self.eval_at_epoch_ends and self.ends_epoch(step)) or self.evaluates_mid_epoch(step)

    def evaluates_mid_epoch(self, step):  # every --eval-steps, whatever the budget
        return bool(self.eval_steps) and step % self.eval_steps == 0

    def saves(self, step):
        """Whether a mid-epoch checkpoint is due (an epoch's end takes one anyway)."""
        return bool(self.save_every) and step % self.save_every == 0 and not self.ends_epoch(step)

    def evaluations_up_to(self, step):
        """How many evaluations the first `step` steps hold (the bar counts their batches)."""
        return sum(map(self.evaluates, range(1, step + 1)))


def review_predictions(predicted, reviews, n):
    """Each review's prediction (or loss), from those per row (or per slot) and the review
    each one is (-1: an empty slot). Padding repeats reviews: each must be predicted."""
    out, seen = np.zeros(n, dtype=predicted.dtype), np.zeros(n, dtype=bool)
    filled = reviews >= 0
    out[reviews[filled]], seen[reviews[filled]] = predicted[filled], True
    if not seen.all():
        raise RuntimeError(f"{(~seen).sum()} eval samples got no prediction")
    return out


class Evaluations:
    """Every evaluation's figures; the best one (--metric-for-best-model), whose weights
    --load-best-model-at-end keeps in <output-dir>/best (<output-dir>/model at the end); and
    early stopping after --early-stopping-patience evaluations without a better one, as the
    Trainer's EarlyStoppingCallback."""

    def __init__(self, args, state, checkpoints, progress):
        self.args, self.state, self.checkpoints, self.progress = args, state, checkpoints, progress

    def record(self, figures, seconds):
        state, args = self.state, self.args
        step = state["global_step"]
        entry = {"step": step, "epoch": round(state["epoch"] + state["step"] / max(
            self.progress.plan.per_epoch, 1), 2), **figures, "eval_seconds": seconds}
        state["evaluations"].append(entry)
        self.progress.scalars(step, **{"eval/" + name.replace("eval_", ""): value
                                       for name, value in figures.items()})
        if args.load_best_model_at_end:
            if self.better(figures, state["best"]):
                state["best"], state["since_best"] = entry, 0
                self.checkpoints.save_best(entry)
            else:
                state["since_best"] += 1

    def mid_epoch(self, evaluate):
        """--eval-steps: the flow evaluates, its figures are recorded (and the best model
        kept), and early stopping may end the run here."""
        self.record(*evaluate())
        self.progress.evaluation_line(self.state["evaluations"][-1])
        self.stop_if_no_better()

    def better(self, figures, best):
        key = "eval_loss" if self.args.metric_for_best_model == "loss" else \
            self.args.metric_for_best_model
        if best is None:
            return True
        return figures[key] < best[key] if key == "eval_loss" else figures[key] > best[key]

    def stop_if_no_better(self):
        patience = self.args.early_stopping_patience
        if patience and self.state["since_best"] >= patience:
            self.state["evaluations"][-1]["stopped_early"] = True  # the run is finished
            self.progress.say(f"early stopping at step {self.state['global_step']:,}: "
                              f"{counted(patience, 'evaluation')} in a row without a better "
                              f"{self.args.metric_for_best_model}")
            raise EarlyStop(patience)


# ----------------------------------------------------------------------------
# 14. Progress: the summary, the one bar, the loss readings.
# ----------------------------------------------------------------------------

class Progress:
    """What the user sees of a run: the summary before it (as HF's Trainer prints one),
    one bar over every train and eval iteration (as the tutorial's), the mean loss every
    --log-every steps (bar, loss curve), a line per evaluation; and TensorBoard scalars."""

    def __init__(self, args, ranks, data, padding, out_dir, state, say):
        self.args, self.ranks, self.data, self.padding = args, ranks, data, padding
        self.out_dir, self.state, self.say = out_dir, state, say
        self.bar = self.board = self.plan = self.schedule = None

    def start(self, model, plan, schedule, eval_batches, **summary):
        """Print what is about to run, then open the bar (a resumed run's where it stopped)."""
        args, self.plan, self.schedule = self.args, plan, schedule
        rows = summary_rows(args, self.data, self.padding, model, plan, schedule, eval_batches,
                            out_dir=self.out_dir, **summary)
        width = max(map(len, rows))
        self.say("\n".join(["Fine-tuning:"] + [f"  {k:<{width}}  {v}" for k, v in rows.items()]))

        def position(steps):  # optimizer steps, and each evaluation's batches
            return steps + eval_batches * plan.evaluations_up_to(steps)
        done = self.state["global_step"]
        self.bar = tqdm(total=position(plan.total), initial=position(done),
                        desc=f"{args.device} training", unit="it", disable=not self.ranks.is_main)
        # --report-to tensorboard: scalars into <output-dir>/tensorboard. A resumed run's go on
        # from its checkpoint: TensorBoard hides the ones a killed run wrote after it
        # (purge_step), so no step is there twice.
        if args.report_to == "tensorboard" and self.ranks.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.board = SummaryWriter(str(self.out_dir / "tensorboard"),
                                       purge_step=done + 1 if done else None)

    def write_results(self, extra=()):  # with the steps since the last reading, left in the sums
        if self.ranks.is_main:
            write_results(self.out_dir, self.state, self.pending_reading(), extra)

    def step_done(self, loss):
        """A step's loss (None: skipped) into the sums; a reading every --log-every steps."""
        state = self.state
        if loss is not None:
            state["loss_sum"] += loss
            state["loss_steps"] += 1
            state["interval_sum"] += loss
            state["interval_steps"] += 1
        if state["global_step"] % self.plan.log_every == 0:
            state["loss_curve"] += self.interval_reading()

    def advance(self, iterations):  # optimizer steps in training, batches in evaluation
        self.bar.update(iterations)

    def pending_reading(self):
        """The mean loss of the steps since the last reading, as loss-curve points:
        [[step, loss, lr]], or none if no step was counted since."""
        state, step = self.state, self.state["global_step"]
        return [[step, state["interval_sum"] / state["interval_steps"],
                 self.schedule.lr_at(step - 1)]] if state["interval_steps"] else []

    def interval_reading(self):
        """pending_reading, taken: shown in the bar and TensorBoard, the sums start anew."""
        state, points = self.state, self.pending_reading()
        for step, mean, lr in points:
            state["interval_sum"], state["interval_steps"] = 0.0, 0
            rate = state["train_samples"] / max(state["train_seconds"], 1e-9)
            self.bar.set_postfix(loss=f"{mean:.4f}", samples_per_s=f"{rate:.1f}",
                                 refresh=False)  # shown with the bar's next update, not twice
            self.scalars(step, **{"train/loss": mean, "train/learning_rate": lr})
        return points

    def evaluation_line(self, entry):
        if self.ranks.is_main:
            tqdm.write(f"step {entry['step']:,}: accuracy {entry['accuracy']:.3f}, "
                       f"f1 {entry['f1']:.3f}, eval loss {entry['eval_loss']:.4f}")

    def epoch_line(self, epoch, steps):
        """The tutorial's "Accuracy: 0.xxx" (where the epoch's end evaluated), then the
        epoch's train loss and speed; an epoch the run ends early says after how many steps."""
        self.scalars(epoch["step"], **{"train/samples_per_s": epoch["train_samples_per_s"]})
        plan = self.plan
        if self.ranks.is_main:
            if epoch["step"] == plan.total:
                self.bar.close()  # drawn for the last time at 100%, before the last line
            accuracy = f"Accuracy: {epoch['accuracy']:.3f}  " if "accuracy" in epoch else ""
            early = (f"; the run ends after {steps:,} of its {plan.per_epoch:,} steps"
                     if steps < plan.per_epoch else "")
            tqdm.write(f"{accuracy}(epoch {epoch['epoch']} of {plan.epochs}: train loss "
                       f"{epoch['train_loss']:.4f}, {epoch['train_samples_per_s']:,.1f} train "
                       f"samples/s{early})")

    def scalars(self, step, **values):  # --report-to tensorboard
        if self.board is not None:
            for name, value in values.items():
                self.board.add_scalar(name, value, step)
            self.board.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.board is not None:
            self.board.close()
            self.board = None


def summary_rows(args, data, padding, model, plan, schedule, eval_batches, step_rows,
                 accumulation, device, extra, out_dir):
    """The summary's rows: the data, the batches (how texts fill them), the optimizer steps,
    the bar, the model."""
    step_samples, layout = step_rows, {"padding": f"{padding}, at most {args.max_length} tokens"}
    left_out = len(data.train) - plan.per_epoch * step_rows
    if data.packing:
        step_samples = (f"{len(data.train) / plan.per_epoch:.1f} on average, in "
                        f"{step_rows} rows of up to {args.max_per_row}")
        layout = {
            "padding": f"packed, up to {args.max_per_row} texts per row of {args.max_length} "
                       "tokens",
            "packing efficiency": f"{data.efficiency():.1%} of row tokens are text "
                                  f"({data.efficiency(packed=False):.1%} padded to max_length)"}
    elif left_out:  # the tutorial's drop_last: only whole optimizer steps
        layout["left out each epoch"] = (
            f"{counted(left_out, 'sample')} of {len(data.train):,}, too few for a whole "
            "optimizer step (drop_last); a new shuffle picks them each epoch")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"device": device,
            "train examples": f"{len(data.train):,}",
            "eval examples": f"{len(data.eval):,}",
            "epochs": f"{plan.epochs} (--max-steps {plan.total:,})" if args.max_steps else
            f"{args.epochs:g}" if plan.total == plan.epochs * plan.per_epoch else
            f"{args.epochs:g} (the last ends at step {plan.total:,})",
            "micro-batch": counted(args.batch_size, data.unit),
            "gradient accumulation": f"{counted(accumulation, 'micro-batch')} per optimizer step",
            **extra,
            "samples per optimizer step": step_samples,
            **describe_training(args, plan, schedule),
            "progress bar": f"one for the run: {counted(plan.total, 'optimizer step')} "
                            f"and {counted(eval_batches, 'eval batch')} per evaluation",
            **layout,
            "trainable parameters": f"{trainable:,}",
            "output directory": out_dir}


def describe_training(args, plan, schedule):
    """The summary's rows on the optimizer steps: how many, their lr, decay, clipping, and
    the evaluations between them."""
    every = f"every {counted(plan.eval_steps, 'step')}" if plan.eval_steps else ""
    evaluation = {"no": "none (--eval-strategy no)", "steps": every,
                  "epoch": "each epoch end" + (f" and {every}" if every else "")
                  }[args.eval_strategy]
    if args.load_best_model_at_end:
        evaluation += f"; the model of the best {args.metric_for_best_model} kept"
    if args.early_stopping_patience:
        patience = counted(args.early_stopping_patience, "evaluation")
        evaluation += f", early stopping after {patience} without a better one"
    return {"optimizer steps per epoch": plan.per_epoch,
            "optimizer steps in total": plan.total,
            "lr schedule": schedule.describe(),
            "weight decay": f"{args.weight_decay:g}, none on biases and LayerNorm weights",
            "gradient clipping": (f"global norm {args.max_grad_norm:g}" if args.max_grad_norm
                                  else "none"),
            "evaluation": evaluation}


def counted(n, noun):
    """'1 micro-batch', '2 micro-batches', '1,024 samples'."""
    plural = noun + ("es" if noun.endswith(("ch", "sh", "s", "x")) else "s")
    return f"{n:,} {noun if n == 1 else plural}"


def stage_table(model, plan, how=None):
    """Each stage's modules and parameters; `how` the stages are placed, in a title line."""
    rows = []
    for stage in sorted({s for _, s in plan}):
        names = [n for n, s in plan if s == stage]
        params = sum(p.numel() for n in names for p in model.get_submodule(n).parameters())
        rows.append((stage, compact_names(names), params))
    width = max(len(r[1]) for r in rows)
    lines = [f"pipeline stage plan ({len(rows)} stages, {how})"] if how else []
    lines += [f"{'stage':>5}  {'modules':<{width}}  {'parameters':>10}"]
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
# 15. Stop requests: Ctrl-C and SIGTERM end a run cleanly.
# ----------------------------------------------------------------------------

class StopRequest:
    """Ctrl-C or SIGTERM: finish the current step, save, and exit cleanly.

    A second one stops at once, but never inside a save: a checkpoint, once begun, is
    written whole first; once the stop is under way, any further one is ignored. Signals
    are kept by number (the exit code is 128 + it).
    """

    def __init__(self):
        self.signal, self.in_save, self.deferred = None, False, False
        self.previous = {}  # the handlers from before, while this one's are installed

    def install(self):  # from the run's first step: before it, Ctrl-C just ends the process
        self.previous = {sig: signal.signal(sig, self.handle)
                         for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self, stopping=False):
        """The handlers from before, once; a run that a signal stops ignores any further one
        (a Ctrl-C on the way out would cut its exit into a traceback)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_IGN if stopping else handler)
        self.previous = {}

    def handle(self, signum, frame):
        if self.signal is None:
            self.signal = signum
        elif self.in_save:
            self.deferred = True
        else:
            raise StopNow(signum)

    @contextlib.contextmanager
    def saving(self, then_stop):
        self.in_save = True
        try:
            yield
        finally:
            self.in_save = False
        if self.deferred and then_stop:
            raise StopNow(self.signal)

    def requested(self, ranks):
        """Whether to stop now; under torchrun all ranks agree, so they stop at one step."""
        if not ranks.enabled:
            return self.signal is not None
        flag = torch.tensor([self.signal or 0], dtype=torch.int32, device=ranks.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a signal's number, on any rank
        # Only what all ranks saw decides: a signal that lands after the all-reduce waits
        # for the next step's, or one rank would stop a step before the others.
        agreed = int(flag)
        if agreed:
            self.signal = self.signal or agreed
        return bool(agreed)


def exit_on_stop(run, why):
    """Save (unless a second signal asked to stop at once), say how to resume, and exit
    as a process ended by that signal does: 128 + its number (SIGINT 130, SIGTERM 143)."""
    signum, save = why.args[0], isinstance(why, Interrupted)
    run.stop.restore(stopping=True)  # the stop is under way: a further signal cannot cut it
    path = (run.checkpoints.save(then_stop=False) if save and run.checkpoints.mid_epoch
            else run.checkpoints.newest())
    run.progress.write_results()  # all it measured, up to the stop
    run.close(stopping=True)
    how = "" if save else " (a second one: at once, without saving)"
    run.say(f"\nstopped by {signal.Signals(signum).name}{how} at epoch {run.state['epoch'] + 1}, "
            f"step {run.state['step']}; checkpoint: {path}\nresume with: "
            + resume_command(run.out_dir, run.ranks.world, run.ranks.per_node))
    raise SystemExit(128 + signum) from None


class Interrupted(Exception):
    """Stop at the end of this step: a Ctrl-C or SIGTERM (its number, args[0])."""


class EarlyStop(Exception):
    """--early-stopping-patience evaluations in a row found no better model: the run ends."""


class StopNow(BaseException):
    """A second Ctrl-C or SIGTERM: stop at once. A BaseException, as KeyboardInterrupt is,
    so that no `except Exception` on the way takes it for an error of its own."""


# ----------------------------------------------------------------------------
# 16. Checkpoints: atomic, safetensors + JSON, never a pickle.
#
# Each checkpoint is written into a hidden temporary directory, flushed to
# disk, and renamed into place: a kill mid-write leaves the previous one whole.
# ----------------------------------------------------------------------------

class Checkpoints:
    """What a checkpoint holds (a TrainedState, section 16, with the run's state), when one
    is taken, and --resume. Where the host has the current weights mid-epoch (CUDA/CPU):
    every --save-every steps and at a stop request; always at the end of an epoch."""

    def __init__(self, args, out_dir, ranks, tokenizer, state, stop, say):
        self.args, self.out_dir, self.ranks, self.tokenizer = args, out_dir, ranks, tokenizer
        self.state, self.stop, self.say = state, stop, say  # stop: the run's StopRequest
        self.held, self.mid_epoch = None, False  # a TrainedState once a flow has its optimizer

    def hold(self, model, optimizer, mid_epoch, stage=None):
        """What checkpoints hold from now on; mid_epoch: the host has the current weights
        between epoch ends too. stage: a torchrun pipeline's (stage module, prefix of the
        model's names in it)."""
        self.held = TrainedState(model, optimizer, self.ranks, stage, self.tokenizer)
        self.mid_epoch = mid_epoch

    def resume_if_asked(self):
        """--resume: the newest checkpoint into the model, the optimizer and the run's state."""
        if self.args.resume:
            lrs = [group["lr"] for group in self.held.optimizer.param_groups]
            state, path = load_checkpoint(self.out_dir, self.held,
                                          on_ipu=self.args.device == "ipu", say=self.say)
            self.state.update(state)  # (a checkpoint from before a key existed: its default)
            groups = self.held.optimizer.param_groups
            for group, lr in zip(groups, lrs):  # the optimizer's own lr: a CUDA graph reads it
                group["lr"] = lr
            set_lr(self.held.optimizer, self.args.lr)  # a resume may change --lr
            groups[0]["weight_decay"] = self.args.weight_decay  # and --weight-decay (decay_groups)
            self.say(f"resumed from {path} (epoch {state['epoch'] + 1}, step {state['step']})")

    def save(self, then_stop=True):
        """A checkpoint, which a second Ctrl-C does not cut short (then_stop: it stops the
        run once the checkpoint is written); returns the newest checkpoint."""
        with self.stop.saving(then_stop):
            snapshot = self.held.snapshot()
            if self.ranks.is_main:
                save_checkpoint(self.out_dir, snapshot, self.state, self.args.keep)
                # the new run has a checkpoint: the run it replaced can go
                shutil.rmtree(self.out_dir / OVERWRITTEN, ignore_errors=True)
        if self.ranks.enabled:
            dist.barrier()
        return self.newest()

    def newest(self):
        return (list_checkpoints(self.out_dir) or ["none"])[-1]

    def save_best(self, entry):
        """--load-best-model-at-end: this evaluation's weights as <output-dir>/best, a model
        directory, replacing the one before (under torchrun every rank gives its part)."""
        snapshot = self.held.snapshot(with_optimizer=False)  # None on the other ranks
        if self.ranks.is_main:
            with writing(f"the best model to {self.out_dir / BEST}"):
                write_model_dir(self.out_dir / BEST, lambda folder: write_model_files(
                    folder, snapshot, {"best.json": entry}))


CHECKSUMS = "checksums.json"


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder):
    """A SHA-256 of each file, so that damage after writing (a copy cut short, a bad
    disk) is found when the folder is read again."""
    sums = {f.name: sha256_of(f) for f in sorted(folder.iterdir()) if f.name != CHECKSUMS}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1))


def damaged_files(folder):
    """Files missing or changed since write_checksums(); none known without a checksums.json."""
    if not (folder / CHECKSUMS).exists():
        return []
    try:
        sums = read_json(folder / CHECKSUMS)
    except FinetuneError:
        sums = None
    if not isinstance(sums, dict):  # the checksums themselves are damaged
        return [CHECKSUMS]
    return [name for name, digest in sums.items()
            if not (folder / name).is_file() or sha256_of(folder / name) != digest]


@contextlib.contextmanager
def writing(what):
    """A full disk or an unwritable folder while writing: one line, not a traceback."""
    try:
        yield
    except OSError as exc:
        raise FinetuneError(f"could not write {what} ({exc.strerror or exc})") from None


# PopTorch's AdamW keeps the Adam moments in these parts of its state_dict(), as
# tensors named by the IPU graph; torch's `state` stays empty (poptorch/optim.py).
IPU_OPTIMIZER_PARTS = ("ipu_state", "ipu_param")


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state(prefix):
    """The random generators' state: tensors (named from `prefix`), and JSON."""
    tensors = {prefix + "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"{prefix}cuda.{i}": s
                        for i, s in enumerate(torch.cuda.get_rng_state_all())})
    np_state = np.random.get_state()
    return tensors, {"python": random.getstate(),
                     "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def set_rng_state(tensors, saved, prefix):
    torch.set_rng_state(tensors[prefix + "torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith(prefix + "cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = saved["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))


def split_optimizer_state(opt_state, prefix=""):
    """An optimizer's state_dict() as tensors (for safetensors) and the rest (for JSON);
    `prefix` tells pipeline stages' optimizers apart."""
    groups = [{k: v.item() if torch.is_tensor(v) else v for k, v in group.items()}  # a CUDA lr
              for group in opt_state["param_groups"]]
    tensors, rest = {}, {"param_groups": groups, "state": {}, "ipu_parts": []}
    for pid, values in opt_state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                rest["state"].setdefault(str(pid), {})[key] = value
    for part in IPU_OPTIMIZER_PARTS:
        if opt_state.get(part) is not None:
            rest["ipu_parts"].append(part)
            tensors.update({f"{part}/{name}": value.detach().cpu().contiguous()
                            for name, value in opt_state[part].items()})
    return tensors, rest


def join_optimizer_state(tensors, rest, prefix=""):
    opt_state = {"param_groups": rest["param_groups"], "state": {}}
    opt_state.update({part: {} for part in rest.get("ipu_parts", [])})
    for key, value in tensors.items():
        part, _, name = key.partition("/")
        if part in IPU_OPTIMIZER_PARTS:
            opt_state[part][name] = value
        elif key.startswith(prefix) and not key.startswith("rng."):
            pid, name = key[len(prefix):].split(".", 1)
            opt_state["state"].setdefault(int(pid), {})[name] = value
    for pid, values in rest["state"].items():
        opt_state["state"].setdefault(int(pid), {}).update(values)
    return opt_state


class TrainedState:
    """What a checkpoint keeps of training: the weights and the optimizer's state (under
    torchrun pipelines each stage holds its part of them: replica 0's are kept) and every
    rank's random state, so that each rank continues as if never stopped."""

    def __init__(self, model, optimizer, ranks=None, stage=None, tokenizer=None):
        self.model, self.optimizer, self.stage = model, optimizer, stage  # stage: pipelines
        self.ranks, self.tokenizer = ranks or Ranks(), tokenizer

    def _weights(self):
        if self.stage is None:
            return self.model.state_dict()
        # The trace keeps buffers the model does not save (position and token type ids).
        module, prefix = self.stage
        saved = self.model.state_dict().keys()
        return {name[len(prefix):]: value for name, value in module.state_dict().items()
                if name[len(prefix):] in saved}

    @staticmethod
    def rng_prefix(rank):  # each rank draws its own dropout masks: its own random state
        return "rng." if rank == 0 else f"rng.rank{rank}."

    def _optimizer_prefix(self):
        return "" if self.stage is None else f"stage{self.ranks.stage}."

    def _part(self, with_optimizer):
        """This rank's share: its random state, and on replica 0 of each stage its weights
        and optimizer state (the other replicas hold copies of them)."""
        ranks = self.ranks
        tensors, rng_json = rng_state(self.rng_prefix(ranks.rank))
        part = {"weights": {}, "tensors": tensors, "rng": rng_json, "stage": ranks.stage}
        if ranks.replica == 0:
            part["weights"] = {k: v.detach().cpu() for k, v in self._weights().items()}
            if with_optimizer:
                opt_tensors, part["optimizer"] = split_optimizer_state(
                    self.optimizer.state_dict(), self._optimizer_prefix())
                tensors.update(opt_tensors)
        return part

    def snapshot(self, with_optimizer=True):
        """Every rank's share, as a Snapshot on rank 0 (None elsewhere): under torchrun all
        ranks must call it."""
        ranks, part = self.ranks, self._part(with_optimizer)
        everyone = [part]
        if ranks.enabled:  # rank 0 keeps its own share here instead of pickling it to itself
            everyone = [None] * ranks.world if ranks.is_main else None
            dist.gather_object(None if ranks.is_main else part, everyone, dst=0)
            if not ranks.is_main:
                return None
            everyone[0] = part
        weights, tensors, optimizers = {}, {}, {}
        for share in everyone:
            weights.update(share["weights"])
            tensors.update(share["tensors"])
            if "optimizer" in share:
                optimizers[str(share["stage"])] = share["optimizer"]
        saved = {"rng_ranks": {str(rank): share["rng"] for rank, share in enumerate(everyone)},
                 "processes": ranks.world,
                 "processes_per_node": ranks.per_node}
        if optimizers:
            saved["optimizer"] = optimizers["0"] if self.stage is None else {"stages": optimizers}
        return Snapshot(weights, tensors, saved, self.model.config, self.tokenizer)

    def restore(self, weights, tensors, saved):
        """This rank's share of a checkpoint (`saved`: its state.json) into its model,
        optimizer and random generators."""
        ranks = self.ranks
        if self.stage is None:
            self.model.load_state_dict(weights)
            opt_json = saved["optimizer"]
        else:
            module, prefix = self.stage
            mine = {name: weights[name[len(prefix):]] for name in module.state_dict()
                    if name[len(prefix):] in weights}
            module.load_state_dict(mine, strict=False)
            opt_json = saved["optimizer"]["stages"][str(ranks.stage)]
        try:
            self.optimizer.load_state_dict(join_optimizer_state(tensors, opt_json,
                                                                self._optimizer_prefix()))
        except ValueError as exc:  # one group before weight decay was grouped (issue 29)
            raise FinetuneError(f"the checkpoint's optimizer state does not fit this run's "
                                f"optimizer ({exc}): it was written by an earlier version of "
                                "this script; start a new run") from None
        rngs = saved.get("rng_ranks") or {"0": saved["rng"]}  # "rng": older checkpoints
        rank = ranks.rank if str(ranks.rank) in rngs else 0
        set_rng_state(tensors, rngs[str(rank)], self.rng_prefix(rank))


# What a checkpoint holds, gathered on rank 0: the weights (model.safetensors); the optimizer's
# and the random generators' tensors (optimizer.safetensors); what state.json adds to the
# run's state (the rest of both, as JSON); the config and tokenizer, which make it a model
# directory too.
Snapshot = collections.namedtuple("Snapshot", "weights tensors saved config tokenizer")


def save_checkpoint(out_dir, snapshot, state, keep):
    """Write TrainedState.snapshot() and the run's state as the newest checkpoint. With
    its config and tokenizer it is a model directory, as save_pretrained writes one:
    --predict and --model take a checkpoint of an unfinished run."""
    # step-N mid-epoch, step-N-end after an epoch: names sort in the order they were taken.
    final = out_dir / "checkpoints" / (f"step-{state['global_step']:08d}"
                                       + ("" if state["step"] else "-end"))
    if final.exists():  # this very state is saved already (Ctrl-C right after a checkpoint)
        if not damaged_files(final):
            return final
        shutil.rmtree(final)  # the damaged copy a resumed run fell back from
    try:
        write_model_dir(final, lambda folder: write_model_files(folder, snapshot, {
            "optimizer.safetensors": snapshot.tensors, "state.json": {**state, **snapshot.saved}}))
    except OSError as exc:  # a full disk: the previous checkpoint stays the newest, intact
        previous = list_checkpoints(out_dir)
        kept = f"the newest intact one is {previous[-1]}" if previous else "no earlier one"
        raise FinetuneError(f"could not write checkpoint {final} ({exc.strerror or exc}); "
                            f"{kept}") from None
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def write_model_files(folder, snapshot, extra):
    """A model directory (a Snapshot's weights, config, tokenizer) with `extra` files
    (tensors, or JSON)."""
    save_file({k: v.contiguous() for k, v in snapshot.weights.items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    snapshot.config.save_pretrained(folder)
    if snapshot.tokenizer is not None:
        snapshot.tokenizer.save_pretrained(folder)
    for name, content in extra.items():
        if name.endswith(".safetensors"):
            save_file(content, folder / name)
        else:
            (folder / name).write_text(json.dumps(content))


def write_model_dir(final, *writes):
    """What each `write(folder)` writes, in a temporary directory, checksummed, flushed to disk
    and renamed into place (the rename flushed too): a kill mid-write leaves the previous one;
    a failed write (a full disk) leaves no temporary directory."""
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for write in writes:
            write(tmp)
        write_checksums(tmp)
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        move_into_place(tmp, final)
        fsync_path(final.parent)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_into_place(source, final):
    """Rename a directory to `final`, the one there set aside first and removed after: a
    kill in between leaves one of them whole."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(source, final)
    shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(out_dir):
    """Complete checkpoints, oldest first (temporary directories are hidden)."""
    root = Path(out_dir) / "checkpoints"
    return sorted(root.glob("step-*")) if root.is_dir() else []


def load_checkpoint(out_dir, held, on_ipu=False, say=print):
    """Restore the newest intact checkpoint into a TrainedState; return the run state and
    the checkpoint. All it holds is read and checked before anything is restored from it.

    A damaged checkpoint (its checksums, or files that do not read) is reported in
    one line and the one before it is tried: that is what --keep is for.
    """
    checkpoints = list_checkpoints(out_dir)
    if not checkpoints:
        raise FinetuneError(f"no checkpoint in {out_dir}/checkpoints: nothing to resume")
    problems = []
    for path in reversed(checkpoints):
        damaged = damaged_files(path)
        try:
            if damaged:
                raise FinetuneError(f"{damaged[0]}: its checksum is not the one written with it")
            state = read_json(path / "state.json")
            weights, tensors = (load_file(path / name)
                                for name in ("model.safetensors", "optimizer.safetensors"))
            break
        except Exception as exc:  # safetensors: truncated or unreadable
            why = str(exc) if isinstance(exc, FinetuneError) else first_line(exc)
            say(f"warning: checkpoint {path} is damaged ({why}); trying the one before it")
            problems.append(f"{path.name}: {why}")
    else:
        raise FinetuneError(f"no intact checkpoint in {out_dir}/checkpoints "
                            f"({'; '.join(problems)})")
    expected = held.model.state_dict()
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in weights):
        raise FinetuneError(f"{path} was saved from another model architecture than --model")
    saved = {key: state.pop(key) for key in SNAPSHOT_KEYS if key in state}
    written_on_ipu = bool(saved["optimizer"].get("ipu_parts"))
    if written_on_ipu != on_ipu:  # the Adam moments are kept in another form on each
        raise FinetuneError(f"{path} was written on {'an IPU' if written_on_ipu else 'CUDA/CPU'}: "
                            f"resume it with --device {'ipu' if written_on_ipu else 'cpu or cuda'}")
    processes = saved.get("processes", 1)
    if processes != held.ranks.world:  # each process's share of a step would change
        raise FinetuneError(f"{path} was written by {processes} process(es), this run has "
                            f"{held.ranks.world}: resume it as it ran, with "
                            + resume_command(path.parent.parent, processes,
                                             saved.get("processes_per_node")))
    held.restore(weights, tensors, saved)
    return state, path


SNAPSHOT_KEYS = ("optimizer", "rng", "rng_ranks", "processes", "processes_per_node")


def resume_command(out_dir, processes=1, per_node=None):
    """The command that continues a run as it ran: alone, or torchrun with its processes."""
    script = sys.argv[0] if sys.argv[0].endswith(".py") else "finetune_electra.py"
    per_node = per_node or processes
    # `python` where that is this environment's, else this interpreter: another environment
    # has not its packages.
    on_path = shutil.which("python")
    python = "python" if on_path and Path(on_path).parent == Path(sys.executable).parent \
        else sys.executable
    if processes == 1:
        return f"{python} {script} --resume {out_dir}"
    nodes = processes // per_node
    on_nodes = (f" --nnodes {nodes} (on each of the {nodes} nodes, with the run's rendezvous "
                "options)") if nodes > 1 else ""
    torchrun = "torchrun" if python == "python" else f"{python} -m torch.distributed.run"
    return f"{torchrun} --nproc-per-node {per_node}{on_nodes} {script} --resume {out_dir}"


# ----------------------------------------------------------------------------
# 17. Results: metrics per epoch, the loss/accuracy plot, the final model.
# ----------------------------------------------------------------------------

def write_results(out_dir, state, pending=(), extra=()):
    """All a run measured so far (`state`), as files: metrics.jsonl, a line per epoch and
    one per evaluation between epoch ends (those have no train_loss), and `extra` lines (an
    epoch a --max-steps ended: partial); the loss curve as [step, loss, lr], with `pending`
    points (the last steps' loss, not yet read out); curves.png plots both."""
    metrics, evaluations = state["metrics"] + list(extra), state["evaluations"]
    loss_curve = state["loss_curve"] + list(pending)
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    epoch_steps = {m["step"] for m in metrics}
    lines = sorted(metrics + [e for e in evaluations if e["step"] not in epoch_steps],
                   key=lambda m: m["step"])
    with writing(f"the results in {out_dir}"):
        with open(out_dir / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in lines)
        (out_dir / "loss_curve.json").write_text(json.dumps(loss_curve))
        fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
        if loss_curve:
            steps, losses = [p[0] for p in loss_curve], [p[1] for p in loss_curve]
            loss_ax.plot(steps, losses, marker="o" if len(steps) <= 50 else None)  # few: visible
        loss_ax.set(xlabel="optimizer step", ylabel="train loss", title="Training loss")
        measured = [m for m in lines if "accuracy" in m]
        acc_ax.plot([m["step"] for m in measured], [m["accuracy"] for m in measured], marker="o")
        for epoch_end in sorted(m["step"] for m in state["metrics"]):
            acc_ax.axvline(epoch_end, color="0.85", zorder=0)  # the epochs' ends
        acc_ax.set(xlabel="optimizer step (grey: epoch ends)", ylabel="accuracy",
                   title="Validation accuracy")
        fig.tight_layout()
        fig.savefig(out_dir / "curves.png")
        plt.close(fig)


def save_model(out_dir, model, tokenizer, say, best=None):
    """The fine-tuned model for from_pretrained, with the checksums --predict checks. With
    --load-best-model-at-end (`best`: its evaluation), <output-dir>/best, the best
    evaluation's model, becomes <output-dir>/model (renamed: no second copy), as the
    Trainer's final model is the best; a resumed run that found no better one has it there
    already. `model` gets its weights."""
    final = out_dir / "model"
    if best is None:  # as checkpoints are: a kill mid-write leaves no half-written model
        with writing(f"the model to {final}"):
            write_model_dir(final, model.save_pretrained, tokenizer.save_pretrained)
    else:
        held = [d for d in (out_dir / BEST, final) if (d / "best.json").is_file()
                and read_json(d / "best.json")["step"] == best["step"]]
        if not held:
            raise FinetuneError(f"{out_dir / BEST} does not hold the best evaluation's model "
                                f"(step {best['step']}); it was removed or damaged")
        if held[0] != final:
            with writing(f"the best model to {final}"):
                move_into_place(held[0], final)
    shutil.rmtree(out_dir / OVERWRITTEN, ignore_errors=True)  # the run it replaced can go
    if best is not None:
        model.load_state_dict(load_file(final / "model.safetensors"), strict=False)
        figures = (f"accuracy {best['accuracy']:.3f}, f1 {best['f1']:.3f}, "
                   f"eval loss {best['eval_loss']:.4f}")
        say(f"best model: step {best['step']:,} (epoch {best['epoch']:g}): {figures}")


# ----------------------------------------------------------------------------
# 18. The same recipe on CUDA or CPU, in one process or many (torchrun).
#
# Nothing here forces static shapes, so by default each batch is padded only to
# its longest review, and reviews of similar length are batched together. The
# loop calls forward, backward and the optimizer step that a PopTorch training
# model runs by itself.
# ----------------------------------------------------------------------------

def finetune_with_torch(args, device, model, plan, data, ranks, run):
    """The tutorial's recipe with plain PyTorch: one process, DDP, or pipeline stages."""
    # An optimizer step: micro-batches of --batch-size, accumulated as on the IPU, on
    # every replica (each of torchrun's data-parallel copies) a share of its batch.
    accumulation = gradient_accumulation(args, ranks.stages)
    step_batch = args.batch_size * accumulation  # one replica's share of an optimizer step
    step_size = step_batch * ranks.replicas
    data.require_train(step_size, "one optimizer step's batch")
    train_set = data.train_dataset(step_size, accumulation * ranks.replicas, multiple=step_size)
    make_loader = functools.partial(torch_loader, pad_id=data.pad_id,  # section 19
                                    multiple=BUCKET if run.padding == "buckets" else 1,
                                    pin_memory=device.type == "cuda")

    # The step functions: the whole model here (alone, or a DDP replica), or this rank's
    # pipeline stage. A training step is forward, backward and the optimizer's step.
    autocast_dtype, precision = choose_precision(args, device, ranks)  # section 20
    classifier = data.classifier(model)  # packed rows: section 11
    if ranks.stages > 1:
        run.say(stage_table(model, plan, f"one stage per rank, {ranks.replicas} replica(s)"))
        train_step, eval_step, optimizer, stage = pipeline_steps(
            classifier, plan, args, ranks, device, accumulation, data.token_types)
    else:
        train_step, eval_step, optimizer = data_parallel_steps(
            classifier, args, device, ranks, accumulation, autocast_dtype)
        stage = None
    run.checkpoints.hold(model, optimizer, mid_epoch=True, stage=stage)
    run.checkpoints.resume_if_asked()
    eval_loader, eval_order = eval_data(data, args, ranks, make_loader)
    graphs = None  # or each step's kernels captured once, then replayed in one launch
    if use_cuda_graphs(args, device, ranks, run.padding, autocast_dtype):
        first_step = make_loader(train_set, [list(range(step_size))])
        graphs = capture_steps(train_step, eval_step, args, run.padding, first_step,
                               eval_loader, device)
        train_step, eval_step = graphs.replaying("train"), graphs.replaying("eval")
    if ranks.enabled:
        run.say(f"torchrun: {ranks.world} ranks = {ranks.replicas} replica(s) x {ranks.stages} "
                f"stage(s); {counted(step_size, data.unit)} per optimizer step")
    run.start(model, steps_per_epoch=len(train_set) // step_size,
              evaluate=functools.partial(evaluate, eval_step, eval_loader, eval_order,
                                         data.eval_labels, run.progress, device, ranks),
              warmup_seconds=graphs.seconds if graphs else 0.0, eval_batches=len(eval_loader),
              step_rows=step_size, accumulation=accumulation, device=ranks.describe(device),
              extra={"precision": precision,
                     "train and eval steps": describe_steps(graphs, args, device, ranks,
                                                            autocast_dtype)})

    group_by_length = args.group_by_length == "yes" or (
        args.group_by_length == "auto" and run.padding in ("dynamic", "buckets"))
    share = slice(ranks.replica * step_batch, (ranks.replica + 1) * step_batch)
    for epoch in run.epochs():
        data.pack_epoch(epoch)
        if run.state["batches"] is None:  # every replica's batches, kept in the checkpoint
            run.state["batches"] = data.train_batches(step_size, args.seed, epoch, group_by_length)
        todo = run.state["batches"][run.state["step"]:run.plan.in_epoch(epoch)]  # resumed: the rest
        loader = make_loader(train_set, [step[share] for step in todo])  # this replica's rows
        losses, samples = [], 0
        for i, (step, batch) in enumerate(zip(todo, loader)):
            run.schedule.update(optimizer, run.state["global_step"] + len(losses))  # its lr
            losses.append(train_step(to_device(batch, device)))
            run.progress.advance(1)  # the bar counts optimizer steps
            samples += data.samples_in_rows(step)
            # Each loss stays on the device, and the host reads them (one sync) only when
            # the run needs them: every --log-every and --save-every steps, at a stop
            # request and at the epoch's end. Meanwhile it queues the next steps' work,
            # so a GPU never waits for the host to look at a loss.
            if run.reading_due(len(losses)) or i == len(todo) - 1:
                run.steps_done(torch.stack(losses).tolist(), samples)
                losses, samples = [], 0

        run.end_epoch(run.evaluate)  # accuracy, F1 and eval loss (--eval-strategy); its line
    if ranks.stages > 1:  # each stage trained its own weights: bring them into rank 0's model
        gather_pipeline_weights(model, run.checkpoints.held, ranks)


def data_parallel_steps(model, args, device, ranks, accumulation, autocast_dtype):
    """The whole model in this process: alone, or one DDP replica under torchrun."""
    model.to(device)
    train_model = model
    if ranks.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = adamw(decay_groups(model, args.weight_decay), args.lr, device, args.weight_decay)
    train_step, eval_step = torch_steps(
        torch.compile(train_model) if args.compile else train_model, model, optimizer, args,
        device, accumulation, autocast_dtype, ranks)
    return train_step, eval_step, optimizer


def torch_steps(model, eval_model, optimizer, args, device, accumulation, autocast_dtype, ranks):
    # Autocast's weight cache must be off where the steps are captured in CUDA graphs.
    autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype, cache_enabled=False)) \
        if autocast_dtype else contextlib.nullcontext
    update = OptimizerStep(optimizer, args, device, loss_scaling=autocast_dtype == torch.float16)

    def train_step(batch, apply=True):
        """One optimizer step on device tensors; returns its loss, still on the device."""
        model.train()
        total = torch.zeros((), device=device)
        # Gradient accumulation: the step's batch is cut into micro-batches whose
        # gradients add up before one optimizer step, as on the IPU. Under DDP the
        # gradients are averaged over the replicas once, with the last micro-batch.
        micro_batches = list(zip(*(v.chunk(accumulation) for v in batch.values())))
        for i, micro in enumerate(micro_batches):
            no_sync = getattr(model, "no_sync", None) if i < len(micro_batches) - 1 else None
            with no_sync() if no_sync else contextlib.nullcontext():
                with autocast():
                    loss = model(**dict(zip(batch, micro))).loss / accumulation
                update.scaled(loss).backward()
            total += loss.detach()
        update.step(ranks.average_over_replicas(total), apply)
        return total

    @torch.no_grad()
    def eval_step(batch):
        eval_model.eval()
        with autocast():
            return eval_model(**{k: v for k, v in batch.items()  # not the labels
                                 if k not in ("labels", "loss_weights")}).logits.float()

    return train_step, eval_step


def evaluate(eval_step, loader, order, labels, progress, device="cpu", ranks=None):
    """Accuracy, F1 and loss over every eval sample, in both flows; `order` says which
    sample each prediction is (-1: an empty packed slot). Returns them with the seconds.

    Every rank predicts its share of the batches; all predictions are gathered
    (the analog of output mode All) and each sample must be predicted at least
    once: repeats, from padding to whole batches, are the same sample's.
    """
    start, predictions, losses = time.perf_counter(), [], []
    for batch in loader:
        batch = to_device(batch, device)
        logits = eval_step(batch)
        if logits is not None:  # None: a pipeline stage before the last
            predictions.append(logits.argmax(-1))  # on the device: no wait per batch
            losses.append(torch.nn.functional.cross_entropy(  # packed: an empty slot's is 0
                logits.flatten(0, -2).float(), batch["labels"].flatten(), ignore_index=-100,
                reduction="none"))
        progress.advance(1)  # the bar counts eval batches too
    mine = [(order, torch.cat(predictions).cpu().numpy(), torch.cat(losses).cpu().numpy())
            ] if predictions else []
    if ranks is not None and ranks.enabled:
        everyone = [None] * ranks.world
        dist.all_gather_object(everyone, mine)
        mine = [part for parts in everyone for part in parts]
    # The tutorial's accuracy_score over every review, with the macro F1 and the mean eval
    # loss (the Trainer's eval_loss).
    reviews, predicted, review_losses = (np.concatenate(parts) for parts in zip(*mine))
    predicted, review_losses = (review_predictions(v.reshape(-1), reviews.reshape(-1), len(labels))
                                for v in (predicted, review_losses))
    return ({"accuracy": accuracy_score(labels, predicted),
             "f1": f1_score(labels, predicted, average="macro"),
             "eval_loss": float(review_losses.mean())}, time.perf_counter() - start)


# ----------------------------------------------------------------------------
# 19. Batches and loaders: which samples make each batch, and how it is padded.
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


def batches_in_order(n, batch_size):
    """0..n-1 in consecutive batches: for rows already in order and in whole batches."""
    return [list(range(i, i + batch_size)) for i in range(0, n, batch_size)]


def eval_data(data, args, ranks, make_loader):
    """This rank's eval batches, and the review each prediction is.

    Traced pipelines and packed rows take whole batches of static rows; otherwise
    reviews of similar length share a batch, longest first.
    """
    pipelined = ranks.stages > 1
    if pipelined or data.packing:
        size = args.batch_size * args.device_iterations if pipelined else (
            args.eval_batch_size or args.batch_size * args.device_iterations)
        eval_set, reviews = data.eval_dataset(size)
        batches = batches_in_order(len(eval_set), size)
    else:
        eval_set, reviews = data.eval, np.arange(len(data.eval))
        batches = eval_batches(data.eval_lengths, args.eval_batch_size or
                               args.batch_size * args.device_iterations)
    mine = batches[ranks.replica::ranks.replicas]
    order = reviews[[i for batch in mine for i in batch]]
    return make_loader(eval_set, mine), order


TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")  # a text's length each


def pad_collate(pad_id, multiple=1):
    """Stack a batch, the token columns padded to its longest text, rounded up to a
    multiple of `multiple` tokens (--padding buckets; packed rows are all full)."""
    padding_values = dict(zip(TOKEN_COLUMNS, (pad_id, 0, 0)))

    def pad(rows, key):
        batch = torch.nn.utils.rnn.pad_sequence([r[key] for r in rows], batch_first=True,
                                                padding_value=padding_values[key])
        extra = -batch.shape[1] % multiple
        return torch.nn.functional.pad(batch, (0, extra), value=padding_values[key])

    def collate(rows):
        return {key: pad(rows, key) if key in padding_values
                else torch.stack([r[key] for r in rows]) for key in rows[0]}
    return collate


def torch_loader(ds, batches, pad_id, multiple=1, pin_memory=False):
    # Its own generator: starting an epoch must not draw from the global RNG that
    # dropout uses, or a resumed run would not replay the same dropout masks.
    # Pinned (page-locked) host memory lets the copy to a GPU run while the host goes on.
    return torch.utils.data.DataLoader(ds, batch_sampler=batches,
                                       collate_fn=pad_collate(pad_id, multiple),
                                       generator=torch.Generator(), pin_memory=pin_memory)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ----------------------------------------------------------------------------
# 20. Precision and CUDA graphs: what makes a GPU's step fast.
# ----------------------------------------------------------------------------

def choose_precision(args, device, ranks):
    """The autocast dtype (None: float32), and the summary's words for it. auto picks what
    the card does well: bfloat16 where it has bfloat16 units (CUDA compute capability 8.0
    and newer), else float16 with loss scaling; float32 on a CPU, which emulates both."""
    if device.type == "cuda":  # float32 matmuls in TF32, on cards that have it
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tf32 = " (TF32 matmuls)" if device.type == "cuda" else ""
    if ranks.stages > 1:
        return None, f"float32{tf32}: pipeline stages are traced in float32"
    if args.fp16:
        return torch.float16, "float16 autocast, dynamic loss scaling (--fp16)"
    if args.bf16 == "yes":
        return torch.bfloat16, "bfloat16 autocast (--bf16 yes)"
    if args.bf16 == "no" or device.type != "cuda":
        return None, "float32" + tf32
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return torch.bfloat16, f"bfloat16 autocast (compute capability {major}.{minor}: native)"
    return torch.float16, (f"float16 autocast, dynamic loss scaling (compute capability "
                           f"{major}.{minor} has no bfloat16 units)")


def fp16_autocast_works(device_type):
    """Whether this torch runs float16 autocast on this device: the IPU host's torch 2.0.1
    turns it off on a CPU, with a warning only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.autocast(device_type, dtype=torch.float16)._enabled


def use_cuda_graphs(args, device, ranks, padding, autocast_dtype):
    """auto: on one CUDA process with static shapes (--compile captures its own), without
    float16's loss scaling."""
    if args.cuda_graphs == "no":
        return False
    possible = device.type == "cuda" and not ranks.enabled and padding != "dynamic"
    if args.cuda_graphs == "yes" and not possible:
        raise FinetuneError("--cuda-graphs yes needs one process on CUDA with static shapes "
                            "(--padding buckets, max_length or packed)")
    if args.cuda_graphs == "yes" and autocast_dtype == torch.float16:
        raise FinetuneError("--cuda-graphs yes: float16's loss scaling runs eagerly; use "
                            "--bf16 yes or --bf16 no with graphs")
    return possible and not args.compile and autocast_dtype != torch.float16


class StepGraphs:
    """The train and eval steps captured as CUDA graphs, one per input shape.

    A step of a small model is about a thousand kernels, each a few microseconds
    on a GPU; launched one by one from Python, the host cannot keep up and the
    GPU waits. A CUDA graph records the step's kernels once and replays them in
    one launch. It needs static shapes and no host sync inside the step: the
    padding buckets (or max_length, or packed rows) give a few shapes, captured
    before training; OptimizerStep keeps the loss on the device. Dropout stays
    random: PyTorch advances the generator's offset at every replay. A shape not
    captured (a last, shorter eval batch) runs eagerly. If capturing fails, the
    whole run falls back to eager steps, with one warning.
    """

    def __init__(self, train_step, eval_step):
        self.steps = {"train": train_step, "eval": eval_step}
        self.warm_up = {"train": lambda batch: train_step(batch, apply=False), "eval": eval_step}
        self.graphs, self.pool, self.failed = {}, None, None
        self.seconds = self.warm_up_seconds = 0.0  # all of it, and the eager warm-up steps

    @staticmethod
    def key(name, batch):
        return name, tuple((k, tuple(v.shape)) for k, v in batch.items())

    def capture(self, name, examples):
        """Warm each shape up on a side stream (as torch.cuda.graph asks: lazy
        initialisation stays out of the graph), then capture them all."""
        start = time.perf_counter()
        try:
            statics = [{k: v.clone() for k, v in example.items()} for example in examples]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for static in statics:
                    self.warm_up[name](static)  # training: the step with its update skipped
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            self.warm_up_seconds += time.perf_counter() - start
            for static in statics:
                graph = torch.cuda.CUDAGraph()
                # One memory pool for all: the graphs never run at the same time.
                with torch.cuda.graph(graph, pool=self.pool):
                    out = self.steps[name](static)
                self.pool = graph.pool()
                self.graphs[self.key(name, static)] = (static, out, graph)
        except Exception as exc:  # e.g. an op that syncs with the host: run eagerly instead
            self.failed, self.graphs = first_line(exc), {}
        self.seconds += time.perf_counter() - start

    def replaying(self, name):
        """The step as the loop calls it: its graph replayed, or run eagerly for a shape
        not captured (a last, shorter eval batch)."""
        return functools.partial(self.run, name)

    def run(self, name, batch):
        captured = self.graphs.get(self.key(name, batch))
        if captured is None:
            return self.steps[name](batch)
        static, out, graph = captured
        for k, v in batch.items():
            static[k].copy_(v, non_blocking=True)
        graph.replay()
        return out.clone()  # the next replay writes over `out`


def capture_steps(train_step, eval_step, args, padding, first_step, eval_loader, device):
    """A graph per shape the run will meet: each bucket's length (or the one static
    length), for a training step and for a full eval batch."""
    lengths = [args.max_length]
    if padding == "buckets":
        lengths = sorted({min(n, args.max_length)
                          for n in range(BUCKET, round_up(args.max_length, BUCKET) + 1, BUCKET)})
    graphs = StepGraphs(train_step, eval_step)
    for name, loader in (("train", first_step), ("eval", eval_loader)):
        batch = to_device(next(iter(loader)), device)  # padded or cut to each length
        graphs.capture(name, [{k: torch.nn.functional.pad(v, (0, n - v.shape[1]))[:, :n]
                               if k in TOKEN_COLUMNS else v for k, v in batch.items()}
                              for n in lengths])
    if graphs.failed:
        tqdm.write(f"warning: capturing CUDA graphs failed ({graphs.failed}); "
                   "every step runs eagerly instead")
    return graphs


def describe_steps(graphs, args, device, ranks, autocast_dtype):
    if graphs and graphs.graphs:
        return (f"CUDA graphs, {len(graphs.graphs)} shapes captured in {graphs.seconds:.1f} s "
                f"({graphs.warm_up_seconds:.1f} s of it warming up; counted in the first "
                "epoch's time)")
    why = (f"capturing CUDA graphs failed: {graphs.failed}" if graphs else
           "torch.compile" if args.compile else
           "--cuda-graphs no" if args.cuda_graphs == "no" else
           "float16 loss scaling" if device.type == "cuda" and autocast_dtype == torch.float16
           else
           "torchrun" if ranks.enabled and device.type == "cuda" else
           "dynamic padding: a new shape almost every batch" if device.type == "cuda" else
           "CPU: the host runs the kernels itself")
    return f"eager ({why})"


# ----------------------------------------------------------------------------
# 21. More devices with torchrun: pipeline stages and replicas on GPUs or CPUs.
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

class LogitsOnly(torch.nn.Module):
    """What the pipeline traces: the token columns in (`names`: ids, mask, and packed rows'
    positions, sentence pairs' token types), logits out (the schedule owns the loss)."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs):
        given = dict(zip(self.names, inputs))
        if not hasattr(self.model, "score"):
            return self.model(**given).logits
        # A decoder's own head finds each text's last token from the input ids, which only
        # the first stage has: here the mask finds it first (its rightmost token, as the
        # head's rightmost non-padding one), and the stages pass it on to the head.
        mask = given["attention_mask"]
        last = (torch.arange(mask.shape[-1], device=mask.device) * mask).argmax(-1)
        hidden = self.model.base_model(**given)[0]
        return self.model.score(hidden[torch.arange(len(last), device=last.device), last])


def model_prefix(wrapped):
    """Where the Hugging Face model sits in a traced module: "model.", packed "model.model."."""
    return next(name for name, module in wrapped.named_modules()
                if isinstance(module, transformers.PreTrainedModel)) + "."


def trace_pipeline(wrapped, plan, example):
    from torch.distributed.pipelining import SplitPoint, pipeline
    first_of_stage, prefix = {}, model_prefix(wrapped)
    for name, stage in plan:
        first_of_stage.setdefault(stage, prefix + name)
    split_spec = {name: SplitPoint.BEGINNING for stage, name in first_of_stage.items() if stage}
    pipe = pipeline(wrapped, mb_args=example, split_spec=split_spec)
    for name in split_spec:  # pipeline() wrapped these forwards in place: undo it for a next trace
        module = wrapped.get_submodule(name)
        del module.forward, module._orig_forward
    return pipe


def pipeline_steps(classifier, plan, args, ranks, device, accumulation, token_types):
    """This rank's stage of the model, trained and evaluated by pipeline schedules.

    The model (or, packed, the PackedClassifier around it) is traced with static
    shapes (one micro-batch of --max-length tokens), like an IPU graph, and once
    per mode: dropout is part of the trace. Both traces share the model's weights.
    """
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe
    # A traced stage (torch 2.13) takes its inputs in the order its graph first uses them:
    # a pair's token types before the mask (the embeddings read them first), packed rows'
    # positions before them (PackedClassifier makes its mask first).
    names = ("input_ids", "attention_mask", "position_ids", "token_type_ids") \
        if isinstance(classifier, PackedClassifier) else ("input_ids", "token_type_ids",
                                                          "attention_mask")
    names = [name for name in names if token_types or name != "token_type_ids"]
    if hasattr(classifier, "score"):  # a decoder's: LogitsOnly reads the mask first
        names = ["attention_mask", "input_ids"]
    wrapped = LogitsOnly(classifier, names)
    # One micro-batch of each, a tensor each: the trace merges a repeated one.
    example = tuple((torch.ones if name == "attention_mask" else torch.zeros)(
        args.batch_size, args.max_length, dtype=torch.long) for name in names)
    stages = {}
    for training in (True, False):
        wrapped.train(training)
        pipe = trace_pipeline(wrapped, plan, example)
        stages[training] = pipe.build_stage(ranks.stage, device, group=ranks.pp_group)
    stage_module = stages[True].submod  # its names are the wrapper's: "model." + the classifier's
    optimizer = adamw(decay_groups(wrapped, args.weight_decay, stage_module.named_parameters()),
                      args.lr, device, args.weight_decay)
    update = OptimizerStep(optimizer, args, device, norm_group=ranks.pp_group)
    # The loss is averaged per micro-batch and the schedule divides the summed
    # gradients by the micro-batch count: one mean over the step's samples.
    # Packed, the schedule's target is the labels alone, so the loss function takes
    # the step's loss weight (the same for all its reviews) from here.
    step_weight = []

    def loss_fn(logits, labels):
        if step_weight:
            return PackedClassifier.loss(logits, labels, step_weight[0] * (labels != -100))
        return torch.nn.functional.cross_entropy(logits, labels)

    schedule = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[args.schedule](
        stages[True], n_microbatches=accumulation, loss_fn=loss_fn)
    eval_schedule = ScheduleGPipe(stages[False], n_microbatches=args.device_iterations)
    first, last = ranks.stage == 0, ranks.stage == ranks.stages - 1

    def inputs(batch):
        return tuple(batch[name] for name in names) if first else ()  # already on the device

    def train_step(batch):
        if "loss_weights" in batch:
            step_weight[:] = [batch["loss_weights"].max()]
        losses = []
        schedule.step(*inputs(batch), target=batch["labels"] if last else None,
                      losses=losses)
        # Only last stages know the loss: every rank gets the mean over replicas.
        loss = torch.stack(losses).mean().detach() if last else torch.zeros((), device=device)
        dist.all_reduce(loss)
        loss /= ranks.replicas
        for param in stage_module.parameters():
            if param.grad is not None:
                ranks.average_over_replicas(param.grad)
        update.step(loss)  # every rank knows the loss: all skip a non-finite one alike
        return loss

    @torch.no_grad()
    def eval_step(batch):
        logits = eval_schedule.step(*inputs(batch))
        return logits if last else None

    return train_step, eval_step, optimizer, (stage_module, model_prefix(wrapped))


def gather_pipeline_weights(model, held, ranks):
    """Each stage trained its own weights: bring them all into rank 0's model."""
    snapshot = held.snapshot(with_optimizer=False)
    if ranks.is_main:
        weights = snapshot.weights
        missing = [name for name, _ in model.named_parameters() if name not in weights]
        if missing:
            raise RuntimeError(f"no pipeline stage holds {missing[:3]}")
        model.load_state_dict(weights, strict=False)


# ----------------------------------------------------------------------------
# 22. Prediction with a fine-tuned model.
# ----------------------------------------------------------------------------

BLANK = "-"  # --predict-file: a blank line's label and probability


def predict_texts(args):
    """--predict: each text's label and its probability, a line each, in the order given.
    A blank line of --predict-file gets the line `-<tab>-<tab>` (no text, no label), so
    that output line N is always input line N."""
    from_file = []
    # Lines as an editor numbers them: split at newlines only (splitlines() would also split
    # at form feeds and Unicode line separators inside a review).
    if args.predict_file:
        lines = read_text(args.predict_file, "--predict-file").split("\n")
        from_file = [line.strip() for line in (lines[:-1] if lines[-1] == "" else lines)]
    if args.predict_file and not any(from_file):
        raise FinetuneError(f"--predict-file {args.predict_file} holds no text")
    texts = args.texts + from_file
    classified = iter(predict(args.predict, [t for t in texts if t], args.max_length))
    results = [next(classified) if text else (BLANK, None) for text in texts]
    for text, (label, prob) in zip(texts, results):
        print(f"{label}\t{BLANK if prob is None else f'{prob:.3f}'}\t{text}")
    return results


@torch.inference_mode()
def predict(model_dir, texts, max_length=512, batch_size=32):
    """model_dir: a saved model, a checkpoint (a model directory too), or a run's output
    directory: its model, else (an unfinished run) its newest checkpoint."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() and (model_dir / "args.json").is_file():
        model_dir = model_dir / "model" if (model_dir / "model").is_dir() else (
            list_checkpoints(model_dir) or [model_dir])[-1]
    if not (model_dir / "config.json").is_file():
        raise FinetuneError(f"--predict {model_dir}: not a saved model (no config.json); use "
                            "<output-dir>/model from a training run, one of its "
                            "<output-dir>/checkpoints/step-*, or the output directory")
    if not texts:
        raise FinetuneError("--predict: give texts to classify, or --predict-file")
    check_model_dir(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    check_tokenizer_fits(model_dir, model, tokenizer)
    max_length = min(max_length, max_tokens(model, tokenizer))  # longer texts are truncated
    pairs = [text.split("\t", 1) for text in texts]  # a sentence pair: first<TAB>second
    if len({len(pair) for pair in pairs}) > 1:
        raise FinetuneError("--predict: give every text as a pair (first<TAB>second), or none")
    columns = list(zip(*pairs))
    results = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(*(list(c[i:i + batch_size]) for c in columns), truncation=True,
                        max_length=max_length, padding=True, return_tensors="pt",
                        return_token_type_ids=takes_token_types(model, len(columns) == 2))
        probs = model(**enc).logits.softmax(-1)
        best = probs.max(-1)
        results += [(model.config.id2label[int(i)], float(p))
                    for p, i in zip(best.values, best.indices)]
    return results


# ----------------------------------------------------------------------------
# 23. Errors the user can fix, and the text files they come from.
# ----------------------------------------------------------------------------

class FinetuneError(Exception):
    """A problem the user can fix: printed as one line, without a traceback."""


class NothingToDo(FinetuneError):
    """Not an error: what was asked is done already. One line, exit code 0."""


def cli(argv=None):
    """`python finetune_electra.py`: a problem the user can fix is one line, exit code 2."""
    try:
        main(argv)
    except NothingToDo as done:
        print(done)
    except KeyboardInterrupt:  # before training began: nothing to save
        print("stopped by SIGINT before training began", file=sys.stderr)
        return 130
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def read_text(path, flag=None):
    """A UTF-8 text file. A byte that is not UTF-8 is an error naming the file and
    where, not silently replaced: the text is what the model learns from."""
    where = f"{flag} {path}" if flag else str(path)
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8(where, exc) from None
    except OSError as exc:
        raise FinetuneError(f"{where}: {exc.strerror}") from None


def check_utf8(path):
    """The same check for a data file that another library reads (some pass bad bytes on)."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                raise not_utf8(path, exc, offset) from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc, offset) from None


def not_utf8(where, exc, offset=0):
    return FinetuneError(f"{where} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                         f"at position {offset + exc.start})")


def read_json(path):
    try:
        return json.loads(read_text(path))
    except ValueError as exc:
        raise FinetuneError(f"{path} is not valid JSON ({exc})") from None


def run_as_script():
    """The process: once the run has ended (a stop included), a further Ctrl-C or SIGTERM
    is ignored, so that nothing cuts the interpreter's exit into a traceback."""
    try:
        return cli()
    except SystemExit as stopped:
        return stopped.code
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(run_as_script())

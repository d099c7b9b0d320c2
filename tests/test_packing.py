"""--padding packed: several reviews per row, each computed exactly as if alone."""

import json
import re
import types

import numpy as np
import pytest
import torch
import transformers

import finetune_electra as fe
from conftest import IMDB_DIR, assert_accuracy_of_saved_model, assert_learned, cli_error, \
    minilm_dir, run_args, sentiment_frame, summary_of, tiny_electra


def packed_and_alone(model, tokenizer, texts, max_length, per_row, seconds=None):
    """Per-review logits from packed rows (with the rows), and each review run alone.
    seconds: each text's second, for sentence pairs (with token type ids)."""
    from datasets import Dataset
    columns = {"text": texts, **({"second": seconds} if seconds else {})}
    ds = Dataset.from_dict({**columns, "label": [i % 2 for i in range(len(texts))]})
    args = fe.parse_args(["--max-length", str(max_length), "--text-column", ",".join(columns)])
    reviews = fe.Reviews(fe.tokenize(ds, tokenizer, args, False, token_types=bool(seconds)))
    rows = fe.pack_rows(reviews.lengths, range(len(reviews)), max_length, per_row)
    packed = fe.PackedRows(reviews, max_length, per_row, tokenizer.pad_token_id, len(rows), 1)
    batch = fe.pad_collate(tokenizer.pad_token_id)([packed.use(rows)[i] for i in range(len(rows))])
    with torch.no_grad():
        logits = fe.PackedClassifier(model, per_row)(**batch).logits
        alone = torch.stack([model(**{k: v[None] for k, v in reviews[i].items() if k != "labels"}
                                   ).logits[0] for i in range(len(texts))])
    by_review = torch.empty_like(alone)
    for r, row in enumerate(rows):
        for slot, review in enumerate(row):
            by_review[review] = logits[r, slot]
    return by_review, alone, rows, batch


def review_texts(n, seed):
    if (IMDB_DIR / "test.parquet").exists():  # real reviews, many of them over 128 tokens
        import pandas as pd
        return pd.read_parquet(IMDB_DIR / "test.parquet").sample(n, random_state=seed).text.tolist()
    return sentiment_frame(n, seed).text.tolist()


# ModernBERT: a window shorter than the rows (its sliding layers' band), then mean pooling.
OTHER_FAMILIES = {"roberta": {}, "distilbert": {}, "llama": {}, "gpt2": {}, "mistral": {},
                  "modernbert": {"local_attention": 16},
                  "modernbert mean": {"local_attention": 16, "classifier_pooling": "mean"},
                  "albert": {}, "deberta-v2": {},  # as DeBERTa-v3 (relative); then as v2:
                  "deberta-v2 absolute": dict(relative_attention=False,
                                              position_biased_input=True)}


@pytest.mark.parametrize("architecture", ["electra", "bert", *OTHER_FAMILIES])
def test_packed_logits_equal_each_review_alone(architecture, tiny_model_dir):
    """Block-diagonal attention, restarted positions, the head on each review's own
    first token: a review's logits do not depend on the reviews it shares a row with."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    torch.manual_seed(0)
    if architecture == "electra":
        model = tiny_electra(max_position_embeddings=256)
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    elif architecture == "bert":  # the real pretrained MiniLM, a pooler between encoder and head
        model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    else:  # RoBERTa: positions from after the padding index; decoders: causal, the last token
        from test_families import tiny_classifier
        family = architecture.split()[0]
        if family.replace("-", "") not in [m[:-len("ForSequenceClassification")].lower()
                          for m in fe.PACKABLE_MODELS]:
            pytest.skip(f"transformers {transformers.__version__}: no packing for {family}")
        model = tiny_classifier(family, **{"n_positions" if family == "gpt2" else
                                           "max_position_embeddings": 260},
                                **OTHER_FAMILIES[architecture])
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.eval()
    texts = review_texts(24, seed=1) + ["Great.", "Awful film!", "Fine"]
    by_review, alone, rows, batch = packed_and_alone(model, tokenizer, texts, 256, per_row=4)
    assert max(map(len, rows)) >= 3 and len(rows) < len(texts)  # reviews did share rows
    assert batch["input_ids"].shape == (len(rows), 256) and batch["labels"].shape == (len(rows), 4)
    torch.testing.assert_close(by_review, alone, rtol=1e-4, atol=1e-4)
    assert (by_review - alone).abs().max() < 1e-4


def test_packed_sentence_pairs_equal_each_pair_alone(tiny_model_dir):
    """Each pair's token type ids (0, then 1) go into its slot of the row (issue 38)."""
    from transformers import AutoTokenizer
    torch.manual_seed(0)
    model = tiny_electra(max_position_embeddings=256).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    firsts, seconds = (sentiment_frame(16, seed).text.tolist() for seed in (2, 3))  # short
    by_review, alone, rows, batch = packed_and_alone(model, tokenizer, firsts, 256, 4, seconds)
    assert max(map(len, rows)) >= 2 and batch["token_type_ids"].max() == 1
    torch.testing.assert_close(by_review, alone, rtol=1e-4, atol=1e-4)


def test_packed_attention_is_block_diagonal_with_positions_from_the_host():
    reviews = [{"input_ids": torch.arange(101, 101 + n), "labels": torch.tensor(0)} for n in (3, 2)]
    row = fe.PackedRows(reviews, 7, 3, 0, step_rows=1, micro_batches=1).use([[0, 1]])[0]
    assert row["attention_mask"].tolist() == [1, 1, 1, 2, 2, 0, 0]
    assert row["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 0]  # restarting with each review
    mask, first_token = fe.packed_attention(row["attention_mask"][None], row["position_ids"][None],
                                            3, torch.float32)
    allowed = (mask[0, 0] == 0) if fe.ADDITIVE_4D_MASK else mask[0].bool()
    expected = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0],
                             [0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0, 0],
                             [0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1, 1]]).bool()
    assert torch.equal(allowed, expected)  # padding attends to padding: no row is all masked
    assert first_token.tolist() == [[[1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0],
                                     [0, 0, 0, 0, 0, 0, 0]]]  # the third slot is empty


def test_the_loss_is_the_mean_over_the_steps_reviews_however_packed():
    """Two micro-batches of one step, averaged as PopTorch and the torch loop average
    them: the mean of the per-review losses over the whole step."""
    lengths = [30, 20, 10, 5, 40, 12, 33, 8, 25]
    reviews = [{"input_ids": torch.arange(101, 101 + n), "labels": torch.tensor(i % 2)}
               for i, n in enumerate(lengths)]
    rows = fe.pack_rows(lengths, range(len(lengths)), 64, 3)
    rows += [[]] * (-len(rows) % 2)  # whole micro-batches
    packed = fe.PackedRows(reviews, 64, 3, 0, step_rows=len(rows), micro_batches=2).use(rows)
    batch = fe.pad_collate(0)([packed[i] for i in range(len(rows))])
    logits = torch.randn(len(rows), 3, 2)
    micro_losses = [fe.PackedClassifier.loss(lg, lb, w) for lg, lb, w in
                    zip(logits.chunk(2), batch["labels"].chunk(2), batch["loss_weights"].chunk(2))]
    filled = batch["labels"] != -100
    expected = torch.nn.functional.cross_entropy(logits[filled], batch["labels"][filled])
    torch.testing.assert_close(sum(micro_losses) / 2, expected)
    assert int(filled.sum()) == fe.samples_in(batch) == len(lengths)


def imdb_like_lengths(n, seed=0):
    """Lengths shaped like IMDB's in BERT tokens at 512: mean ~275, 13% truncated."""
    return np.minimum(np.random.default_rng(seed).lognormal(5.45, 0.6, n).astype(int) + 10,
                      512).tolist()


def test_every_training_review_is_used_once_per_epoch_in_full_rows():
    lengths = imdb_like_lengths(5000)
    packing = fe.Packing(512, 4, seed=7)
    count = packing.rows_per_epoch(lengths, multiple=224)
    assert count % 224 == 0
    epochs = [packing.train_rows(lengths, epoch, count) for epoch in range(3)]
    for rows in epochs:
        assert len(rows) == count
        assert sorted(i for row in rows for i in row) == list(range(5000))
        assert max(map(len, rows)) <= 4
        assert max(sum(lengths[i] for i in row) for row in rows) <= 512
    assert epochs[0] != epochs[1] != epochs[2]  # packed afresh every epoch
    assert epochs[1] == fe.Packing(512, 4, seed=7).train_rows(lengths, 1, count)
    assert epochs[1] != fe.Packing(512, 4, seed=8).train_rows(lengths, 1, count)
    efficiency = sum(lengths) / (count * 512)
    assert sum(lengths) / (5000 * 512) < 0.6 and efficiency > 0.95


def test_spreading_rows_splits_shared_rows_before_adding_empty_ones():
    assert fe.spread_rows([[0, 1, 2], [3]], 3) == [[0, 1], [3], [2]]
    assert fe.spread_rows([[0, 1], [2]], 4) == [[0], [2], [1], []]


def test_every_eval_review_is_predicted_exactly_once():
    lengths = [int(n) for n in imdb_like_lengths(301, seed=3)]
    packing = fe.Packing(512, 4, seed=0)
    rows = packing.eval_rows(lengths, multiple=32)
    assert len(rows) % 32 == 0
    assert sorted(i for row in rows for i in row) == list(range(301))
    slots = np.array([row + [-1] * (4 - len(row)) for row in rows])
    predicted = np.where(slots >= 0, slots % 2, 7)  # review i predicts i % 2; empty slots junk
    assert fe.review_predictions(predicted, slots, 301).tolist() == [i % 2 for i in range(301)]
    with pytest.raises(RuntimeError, match="1 eval samples got no prediction"):
        fe.review_predictions(predicted, np.where(slots == 5, -1, slots), 301)


PACKED = ["--padding", "packed", "--max-per-row", "3"]


def test_packed_cpu_run_learns_and_reports_its_efficiency(tiny_model_dir, sentiment_dir,
                                                          tmp_path, capsys):
    out = tmp_path / "run"
    metrics = fe.main(run_args(tiny_model_dir, sentiment_dir, out, *PACKED, "--epochs", "4"))
    summary = summary_of(capsys.readouterr().out)
    assert_learned(metrics)
    # 400 reviews of 7-47 tokens in rows of 64: 3 per row at most, so at least 134 rows
    # (17 steps of 8 rows); each review once per epoch
    steps = int(summary["optimizer steps per epoch"])
    assert 17 <= steps < 400 // 8 and summary["micro-batch"] == "8 rows"
    assert summary["samples per optimizer step"] == f"{400 / steps:.1f} on average, in 8 rows of up to 3"
    assert summary["padding"] == "packed, up to 3 texts per row of 64 tokens"
    efficiency = metrics[0]["packing_efficiency"]
    shown = re.fullmatch(r"(\S+)% of row tokens are text \((\S+)% padded to max_length\)",
                         summary["packing efficiency"])
    assert shown[1] == f"{efficiency:.1%}"[:-1]
    assert 0.75 < efficiency <= 1 and efficiency > 1.6 * float(shown[2]) / 100
    assert all(m["samples_per_step"] == pytest.approx(400 / steps) for m in metrics)
    written = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert written == metrics
    assert_accuracy_of_saved_model(metrics, out)


@pytest.mark.parametrize("argv, message", [
    (["--max-per-row", "0", "--padding", "packed"], "--max-per-row 0: must be at least 1"),
    (["--max-per-row", "3"], "--max-per-row is for --padding packed (this run pads dynamic)"),
    (["--padding", "packed", "--group-by-length", "yes"],
     "--group-by-length is for --padding dynamic: packing fills rows by length itself"),
])
def test_packing_flags_out_of_place_are_one_error_line(argv, message, tiny_model_dir,
                                                       sentiment_dir, tmp_path, capsys):
    error = cli_error(capsys, run_args(tiny_model_dir, sentiment_dir, tmp_path / "run", *argv))
    assert message in error


def test_a_sliding_window_shorter_than_the_rows_is_refused(sentiment_dir, tmp_path, capsys,
                                                           tiny_model_dir):
    """Mistral attends within a window: a packed row's block-diagonal mask has no band."""
    from transformers import AutoTokenizer
    from test_families import tiny_classifier
    if "MistralForSequenceClassification" not in fe.PACKABLE_MODELS:
        pytest.skip(f"transformers {transformers.__version__}: no packing for Mistral")
    tiny_classifier("mistral", sliding_window=32).save_pretrained(tmp_path / "mistral")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "mistral")
    error = cli_error(capsys, run_args(tmp_path / "mistral", sentiment_dir, tmp_path / "run",
                                       "--padding", "packed"))
    assert error == ("error: --padding packed: MistralForSequenceClassification attends within "
                     "a window of 32 tokens, fewer than --max-length 64; use --max-length 32 or "
                     "--padding max_length")


def test_a_model_whose_head_packing_does_not_know_is_refused(sentiment_dir, tmp_path, capsys,
                                                              tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, MPNetConfig
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(MPNetConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64)).save_pretrained(tmp_path / "mpnet")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "mpnet")
    error = cli_error(capsys, run_args(tmp_path / "mpnet", sentiment_dir, tmp_path / "run",
                                       "--padding", "packed"))
    assert error == (f"error: --padding packed knows the heads of {', '.join(fe.PACKABLE_MODELS)}, "
                     "not MPNetForSequenceClassification: use --padding max_length")
    assert fe.PACKABLE_MODELS[:4] == ("ElectraForSequenceClassification",
                                      "BertForSequenceClassification",
                                      "RobertaForSequenceClassification",
                                      "XLMRobertaForSequenceClassification")


def test_a_family_packed_with_transformers_5_only_says_so(monkeypatch):
    """The IPU host's transformers 4.46: DistilBERT's model there takes no position ids."""
    from test_families import tiny_classifier
    monkeypatch.setattr(fe, "PACKABLE_MODELS", fe.PACKABLE_MODELS[:5])  # as on 4.x
    args = types.SimpleNamespace(max_length=64, max_per_row=3, seed=0)
    with pytest.raises(fe.FinetuneError) as refused:
        fe.packing_for(args, tiny_classifier("distilbert"), "packed")
    assert str(refused.value) == (
        "--padding packed: DistilBertForSequenceClassification packs with transformers 5 (this "
        f"is {transformers.__version__}): use --padding max_length")


def test_deberta_with_a_convolution_is_refused():
    """DeBERTa-v2's optional convolution after its first block mixes neighbouring tokens,
    across the reviews of a row (DeBERTa-v3 has none)."""
    from test_families import tiny_classifier
    if "DebertaV2ForSequenceClassification" not in fe.PACKABLE_MODELS:
        pytest.skip(f"transformers {transformers.__version__}: no packing for DeBERTa-v2")
    args = types.SimpleNamespace(max_length=64, max_per_row=3, seed=0)
    with pytest.raises(fe.FinetuneError) as refused:
        fe.packing_for(args, tiny_classifier("deberta-v2", conv_kernel_size=3), "packed")
    assert str(refused.value) == (
        "--padding packed: DebertaV2ForSequenceClassification mixes neighbouring tokens by a "
        "convolution (conv_kernel_size), across the reviews of a row; use --padding max_length")


def test_packed_rows_go_through_the_ipu_flow_on_the_standin(fake_poptorch, tiny_model_dir,
                                                            sentiment_dir, tmp_path, capsys,
                                                            monkeypatch):
    """The IPU flow (against the PopTorch stand-in, not an IPU) with packed rows: the same
    DataLoader, wrapper, identity_loss, device iterations, accumulation and output mode
    All, the same attach/detach order; it learns, and predictions reach their reviews."""
    compiled = {}
    compile_graph = fake_poptorch._Executor.compile

    def record(executor, *args, **kwargs):
        compiled[executor.name] = {name: tuple(value.shape) for name, value in kwargs.items()}
        return compile_graph(executor, *args, **kwargs)

    monkeypatch.setattr(fake_poptorch._Executor, "compile", record)
    out = tmp_path / "run"
    # 4 rows a micro-batch: at the tests' usual lr 1e-3 accuracy swung by 0.05 from epoch
    # to epoch, and the last epoch's side of 0.9 depended on the CPU (issue 22)
    metrics = fe.main(run_args(tiny_model_dir, sentiment_dir, out, *PACKED, "--device", "ipu",
                               "--ipus", "2", "--device-iterations", "2", "--batch-size", "4",
                               "--lr", "5e-4", "--epochs", "7"))
    summary = summary_of(capsys.readouterr().out)
    # host batches of 4 rows x 2 device iterations x 3 accumulated = 24 rows; eval 4 x 2
    assert compiled == {
        "training": {"input_ids": (24, 64), "attention_mask": (24, 64), "position_ids": (24, 64),
                     "labels": (24, 3), "loss_weights": (24, 3)},
        "inference": {"input_ids": (8, 64), "attention_mask": (8, 64), "position_ids": (8, 64),
                      "labels": (8, 3), "loss_weights": (8, 3)}}
    assert fake_poptorch.IDENTITY_LOSSES == [("training", "none")]
    events = [e for e in fake_poptorch.EVENTS if e[0] != "call"]
    epoch = [("attach", "training"), ("detach", "training"),
             ("attach", "inference"), ("detach", "inference")]
    assert events[6:] == epoch * 7 and events[:6] == [
        ("compile", "training"), ("attach", "training"), ("detach", "training"),
        ("compile", "inference"), ("attach", "inference"), ("detach", "inference")]
    assert summary["host batch"] == "24 rows"
    steps = int(summary["optimizer steps per epoch"])
    assert all(m["samples_per_step"] * steps == pytest.approx(400) for m in metrics)  # each once
    assert_learned(metrics)
    assert_accuracy_of_saved_model(metrics, out)


def test_a_packed_run_resumed_mid_epoch_matches_the_unbroken_run(tiny_model_dir, sentiment_dir,
                                                                tmp_path):
    """Nothing lost: a resumed epoch repacks the same rows and continues at the same step."""
    import shutil
    from test_checkpoints import assert_same_run
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    fe.main(run_args(tiny_model_dir, sentiment_dir, unbroken, *PACKED, "--save-every", "5",
                     "--keep", "100"))
    shutil.copytree(unbroken, resumed)
    first, *later = fe.list_checkpoints(resumed)
    state = json.loads((first / "state.json").read_text())
    assert (state["epoch"], state["step"]) == (0, 5)
    for path in later + [resumed / "model"]:
        shutil.rmtree(path)
    (resumed / "metrics.jsonl").unlink()
    fe.main(["--resume", str(resumed)])
    assert_same_run(unbroken, resumed)

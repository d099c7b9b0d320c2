"""Local dataset layouts, label handling, and the one-line errors a user can hit."""

import os
import subprocess
import sys

import torch
from datasets import Dataset, DatasetDict

import finetune_electra as fe
from conftest import (HANG, ROOT, cli_error, run_args, sentiment_frame,
                      tiny_electra)


def splits_of(path, text="text", label="label", label_names=None):
    splits = fe.select_splits(fe.load_splits(str(path)), text, label)
    names = fe.encode_labels(splits, label, label_names)
    return splits, names


def test_parquet_directory(sentiment_dir):
    splits, names = splits_of(sentiment_dir)
    assert (len(splits["train"]), len(splits["eval"])) == (400, 200)
    assert names == ["0", "1"]


def test_label_names_for_integer_labels(sentiment_dir):
    splits, names = splits_of(sentiment_dir, label_names="neg,pos")
    assert names == ["neg", "pos"]
    assert splits["train"].features["label"].names == ["neg", "pos"]


def test_csv_with_string_labels_maps_them_and_stores_them_in_the_model(
        tmp_path, tiny_model_dir, capsys):
    for split, n in (("train", 64), ("test", 32)):
        frame = sentiment_frame(n, seed=n)
        frame["label"] = frame["label"].map({0: "negative", 1: "positive"})
        frame.rename(columns={"text": "review", "label": "sentiment"}).to_csv(
            tmp_path / f"{split}.csv", index=False)
    fe.main(run_args(tiny_model_dir, tmp_path, tmp_path / "run", "--epochs", "1",
                     "--text-column", "review", "--label-column", "sentiment"))
    assert "labels: 0=negative, 1=positive" in capsys.readouterr().out
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(tmp_path / "run" / "model")
    assert config.id2label == {0: "negative", 1: "positive"}
    assert config.label2id == {"negative": 0, "positive": 1}


def test_aclimdb_folder_layout(tmp_path):
    for split in ("train", "test"):
        for label, texts in (("neg", ["dull film", "bad plot", "awful"]), ("pos", ["great", "fun"])):
            folder = tmp_path / "aclImdb" / split / label
            folder.mkdir(parents=True)
            for i, text in enumerate(texts):
                (folder / f"{i}_7.txt").write_text(text)
    splits, names = splits_of(tmp_path / "aclImdb")
    assert names == ["neg", "pos"]
    assert sorted(zip(splits["train"]["text"], splits["train"]["label"])) == [
        ("awful", 0), ("bad plot", 0), ("dull film", 0), ("fun", 1), ("great", 1)]


def test_save_to_disk_directory(tmp_path):
    DatasetDict({"train": Dataset.from_pandas(sentiment_frame(10, 0)),
                 "test": Dataset.from_pandas(sentiment_frame(6, 1))}).save_to_disk(tmp_path / "saved")
    splits, _ = splits_of(tmp_path / "saved")
    assert (len(splits["train"]), len(splits["eval"])) == (10, 6)


def test_subset_is_seeded_and_only_used_splits_are_tokenized(sentiment_dir, tiny_model_dir):
    splits, _ = splits_of(sentiment_dir)
    a = fe.subset(splits["train"], 50, seed=1)["text"]
    assert a == fe.subset(splits["train"], 50, seed=1)["text"]
    assert a != fe.subset(splits["train"], 50, seed=2)["text"]
    _, tokenizer = fe.load_model(str(tiny_model_dir), ["0", "1"])
    args = fe.parse_args(["--max-length", "16"])
    ds = fe.tokenize(fe.subset(splits["train"], 50, 1), tokenizer, args, "max_length")
    assert ds.column_names == ["labels", "input_ids", "attention_mask", "length"]
    reviews = fe.Reviews(ds)
    row = reviews[0]
    assert sorted(row) == ["attention_mask", "input_ids", "labels"]
    assert row["input_ids"].shape == (16,) and row["input_ids"].dtype == torch.long
    assert row["input_ids"].tolist() == ds[0]["input_ids"] and int(row["labels"]) == ds[0]["labels"]
    assert len(reviews) == 50 and reviews.lengths.max() == 16
    assert [reviews[i]["attention_mask"].sum().item() for i in range(50)] == reviews.lengths.tolist()


def test_missing_column_lists_the_columns(capsys, tiny_model_dir, sentiment_dir, tmp_path):
    err = cli_error(capsys, run_args(tiny_model_dir, sentiment_dir, tmp_path, "--text-column", "review"))
    assert "column 'review' not in the train split; its columns are: text, label" in err


def test_empty_split(capsys, tiny_model_dir, tmp_path):
    sentiment_frame(10, 0).to_csv(tmp_path / "train.csv", index=False)
    sentiment_frame(10, 0).head(0).to_csv(tmp_path / "test.csv", index=False)
    assert "the test split is empty" in cli_error(capsys, run_args(tiny_model_dir, tmp_path, tmp_path / "o"))


def test_empty_and_unreadable_files(capsys, tiny_model_dir, tmp_path):
    sentiment_frame(10, 0).to_parquet(tmp_path / "train.parquet")
    (tmp_path / "test.parquet").write_bytes(b"")
    assert "test.parquet is empty" in cli_error(capsys, run_args(tiny_model_dir, tmp_path, tmp_path / "o"))
    (tmp_path / "test.parquet").write_bytes(b"not parquet")
    err = cli_error(capsys, run_args(tiny_model_dir, tmp_path, tmp_path / "o"))
    assert f"could not read the test files in {tmp_path}" in err


def test_missing_dataset_directory_files(capsys, tiny_model_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("nothing")
    err = cli_error(capsys, run_args(tiny_model_dir, tmp_path, tmp_path / "o"))
    assert "holds no train/test .parquet/.csv/.json(l) files" in err


def test_more_stages_than_layers(capsys, fake_poptorch, tiny_model_dir, sentiment_dir, tmp_path):
    """On IPUs (here the PopTorch stand-in); one CPU process uses no stages, so a model of
    fewer layers than the default 4 stages runs there."""
    err = cli_error(capsys, run_args(tiny_model_dir, sentiment_dir, tmp_path, "--device", "ipu",
                                     "--ipus", "8"))
    assert "8 stages need at least 7 encoder layers" in err and "use --ipus 5 or fewer (on IPUs a power of two: 4 or fewer)" in err


def test_ipu_without_poptorch(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(fe, "poptorch", None)
    err = cli_error(capsys, ["--device", "ipu", "--output-dir", str(tmp_path)])
    assert "needs PopTorch, which comes with Graphcore's Poplar SDK" in err


def test_hub_unreachable_says_so_and_points_to_local_paths(tmp_path):
    """No network here: the default hub names must fail in one line with the way out."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for argv, what in ((["--dataset", "imdb"], "could not load dataset 'imdb' from the Hugging Face Hub"),
                       (["--dataset", str(tmp_path / "data"), "--model", "google/electra-small-generator"],
                        "could not load model 'google/electra-small-generator' from the Hugging Face Hub")):
        if "--model" in argv:
            (tmp_path / "data").mkdir(exist_ok=True)
            sentiment_frame(8, 0).to_parquet(tmp_path / "data" / "train.parquet")
            sentiment_frame(8, 1).to_parquet(tmp_path / "data" / "test.parquet")
        proc = subprocess.run([sys.executable, str(ROOT / "finetune_electra.py"), *argv,
                               "--output-dir", str(tmp_path / "out")],
                              capture_output=True, text=True, env=env, timeout=HANG)
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and what in error[0]
        assert "--model PATH" in error[0] and "--dataset PATH" in error[0]


# --- issue 30: the tokenizer is the model's; text labels named; eval labels trained on ----

def test_a_model_directory_without_its_tokenizer_is_refused(capsys, tiny_model_dir,
                                                            sentiment_dir, tmp_path):
    """Before: AutoTokenizer made a 5-token tokenizer, every word [UNK], rc 0 at chance."""
    model_only = tmp_path / "model-only"
    model_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model_only / name).write_bytes((tiny_model_dir / name).read_bytes())
    err = cli_error(capsys, run_args(model_only, sentiment_dir, tmp_path / "out"))
    assert f"{model_only} has no tokenizer (tokenizer.json, vocab.txt" in err
    assert "needs the model and its tokenizer, each saved with save_pretrained" in err


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(capsys, tiny_model_dir,
                                                            sentiment_dir, tmp_path):
    from transformers import AutoTokenizer
    for vocab_size, words in ((1000, "30,522 tokens and the model's embedding table 1,000 rows"),
                              (100_000, "30,522 tokens and the model's embedding table 100,000")):
        model_dir = tmp_path / f"vocab-{vocab_size}"
        tiny_electra(vocab_size=vocab_size).save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(model_dir)
        err = cli_error(capsys, run_args(model_dir, sentiment_dir, tmp_path / "out"))
        assert words in err and "the tokenizer is not the model's" in err
        assert "the tokenizer is not the model's" in cli_error(
            capsys, ["--predict", str(model_dir), "a fine film"])


def write_text_label_csvs(folder, eval_labels=("negative", "positive")):
    """A Kaggle-style CSV pair: review,sentiment with text labels."""
    folder.mkdir()
    for split, n, labels in (("train", 64, ("negative", "positive")), ("test", 32, eval_labels)):
        frame = sentiment_frame(n, seed=n)
        frame["label"] = frame["label"].map(dict(enumerate(labels)))
        frame.rename(columns={"text": "review", "label": "sentiment"}).to_csv(
            folder / f"{split}.csv", index=False)
    return folder


def test_label_names_order_text_labels(tmp_path):
    """Before: ArrowInvalid 'Failed to parse string: positive as a scalar of type int64'."""
    splits, names = splits_of(write_text_label_csvs(tmp_path / "csv"), "review", "sentiment",
                              label_names="positive,negative")
    assert names == ["positive", "negative"]
    raw = fe.select_splits(fe.load_splits(str(tmp_path / "csv")), "review", "sentiment")
    for split in ("train", "eval"):
        expected = [{"positive": 0, "negative": 1}[v] for v in raw[split]["sentiment"]]
        assert splits[split]["sentiment"] == expected


def test_label_names_that_are_not_the_text_labels_list_the_data_labels(capsys, tmp_path,
                                                                       tiny_model_dir):
    data = write_text_label_csvs(tmp_path / "csv")
    for names in ("neg,pos", "positive", "negative,positive,neutral"):
        err = cli_error(capsys, run_args(tiny_model_dir, data, tmp_path / "out", "--text-column",
                                         "review", "--label-column", "sentiment",
                                         "--label-names", names))
        assert err == (f"error: --label-names {names}: the data's labels are negative,positive; "
                       "give exactly these, in the order of their ids")


def test_a_label_only_the_eval_split_has_is_refused(capsys, tmp_path, tiny_model_dir):
    """Before: a silent 3-class model (labels: 0=0, 1=1, 2=2), its third class never trained."""
    data = write_text_label_csvs(tmp_path / "csv", eval_labels=("negative", "neutral"))
    err = cli_error(capsys, run_args(tiny_model_dir, data, tmp_path / "out", "--text-column",
                                     "review", "--label-column", "sentiment"))
    neutral = sum(sentiment_frame(32, seed=32)["label"])
    assert (f"the eval split has labels the train split lacks: neutral ({neutral} reviews); a "
            "model cannot learn a label it never sees") in err
    ints = tmp_path / "ints"
    ints.mkdir()
    sentiment_frame(64, seed=0).to_parquet(ints / "train.parquet")
    frame = sentiment_frame(32, seed=1)
    frame.loc[:4, "label"] = 2
    frame.to_parquet(ints / "test.parquet")
    err = cli_error(capsys, run_args(tiny_model_dir, ints, tmp_path / "out2"))
    assert "the eval split has labels the train split lacks: 2 (5 reviews)" in err


def test_a_local_folder_named_like_the_hub_dataset_is_said_to_be_used(capsys, monkeypatch,
                                                                       tiny_model_dir, tmp_path):
    """Issue 32: `./imdb/` hid the hub's imdb; the error named only the folder's contents."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imdb").mkdir()
    code = fe.cli(["--model", str(tiny_model_dir), "--device", "cpu"])
    assert code == 2 and capsys.readouterr().err.splitlines() == [
        f"note: --dataset imdb is the local file or directory {tmp_path / 'imdb'}, not the "
        "hub's imdb (for the hub's, run from a directory without imdb)",
        "error: imdb holds no train/test .parquet/.csv/.json(l) files (names must start with "
        "the split, e.g. train.parquet)"]

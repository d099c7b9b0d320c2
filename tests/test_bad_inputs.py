"""Nothing cryptic: every flag out of range and every damaged file the script reads ends
in one `error:` line naming the flag or the file, exit code 2, no traceback.

Table-driven: each flag gets several bad values (zero, negative, absurd, wrong type);
each kind of file gets damaged copies (truncated, bit-flipped, emptied, wrong encoding)."""

import shutil

import pytest
import transformers

import finetune_electra as fe
from conftest import cli_error, run_args, sentiment_frame

BAD_FLAGS = {
    "--epochs": ["0", "-1", "x"],  # 1.5 is an epoch and a half, as the Trainer's (issue 36)
    "--batch-size": ["0", "-4", "x"],
    "--eval-batch-size": ["0", "-1", "x"],
    "--max-length": ["0", "1", "-512", "x"],
    "--gradient-accumulation": ["0", "-1", "x"],
    "--stages": ["0", "-1", "x"],
    "--device-iterations": ["0", "-8", "x"],
    "--train-samples": ["0", "-10", "x"],
    "--eval-samples": ["0", "-10", "ten"],
    "--log-every": ["0", "-1", "x"],
    "--save-every": ["0", "-1", "x"],
    "--keep": ["0", "-2", "x"],
    "--seed": ["-1", "4294967296", "x", "1e3"],
    "--lr": ["0", "-1e-3", "nan", "inf", "2", "x"],
    "--device": ["gpu", ""],
    "--padding": ["none"],
    "--group-by-length": ["maybe"],
    "--schedule": ["zero-bubble"],
    "--bf16": ["always"],
    "--label-names": ["neg,,pos", ","],
}


@pytest.mark.parametrize("flag,value", [(f, v) for f, values in BAD_FLAGS.items() for v in values])
def test_every_flag_out_of_range_is_one_line_before_any_work(capsys, tmp_path, flag, value):
    # ./nowhere as data and model: the flag must be refused before they are even looked at
    err = cli_error(capsys, ["--dataset", "./nowhere", "--model", "./nowhere",
                             "--output-dir", str(tmp_path / "out"), flag, value])
    assert flag in err
    assert not (tmp_path / "out").exists()


def test_a_length_the_model_cannot_take_is_an_error_before_tokenizing(capsys, tiny_model_dir,
                                                                       sentiment_dir, tmp_path):
    err = cli_error(capsys, run_args(tiny_model_dir, sentiment_dir, tmp_path, "--max-length", "200"))
    assert "--max-length 200: this model takes at most 128 tokens" in err


# --- damaged files --------------------------------------------------------------------------

def truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def bit_flipped(path, at=None):
    """One flipped high bit: in text, a byte that is not UTF-8; in binary, a broken header
    or footer (at: where, from the start, or from the end if negative)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x80
    path.write_bytes(bytes(data))


def emptied(path):
    path.write_bytes(b"")


def utf16(path):
    path.write_bytes(path.read_text(encoding="utf-8").encode("utf-16"))


def in_quotes_truncated(path):
    """Cut inside a quoted field: CSV readers cannot end there."""
    data = path.read_bytes()
    path.write_bytes(data[:data.rindex(b'"') - 3])


def data_dir(tmp_path, kind):
    folder = tmp_path / "data"
    folder.mkdir()
    for split, n in (("train", 40), ("test", 20)):
        frame = sentiment_frame(n, seed=n)
        frame["text"] = frame["text"] + ", with a comma"  # CSV quotes these
        path = folder / f"{split}.{kind}"
        {"parquet": lambda: frame.to_parquet(path),
         "csv": lambda: frame.to_csv(path, index=False),
         "jsonl": lambda: frame.to_json(path, orient="records", lines=True)}[kind]()
    return folder


DATA_DAMAGE = [
    ("parquet", truncated), ("parquet", lambda p: bit_flipped(p, at=-2)), ("parquet", emptied),
    ("parquet", lambda p: p.write_text("text,label\nnot a parquet file,1\n")),
    ("csv", in_quotes_truncated), ("csv", bit_flipped), ("csv", emptied), ("csv", utf16),
    ("jsonl", truncated), ("jsonl", bit_flipped), ("jsonl", emptied), ("jsonl", utf16),
]


@pytest.mark.parametrize("kind,damage", DATA_DAMAGE,
                         ids=[f"{k}-{i}" for i, (k, _) in enumerate(DATA_DAMAGE)])
def test_damaged_data_files_are_named(capsys, tiny_model_dir, tmp_path, kind, damage):
    folder = data_dir(tmp_path, kind)
    damage(folder / f"test.{kind}")
    err = cli_error(capsys, run_args(tiny_model_dir, folder, tmp_path / "out"))
    assert f"test.{kind}" in err


@pytest.mark.parametrize("damage", [bit_flipped, lambda p: p.write_bytes("café".encode("latin-1"))])
def test_an_aclimdb_review_that_is_not_utf8_is_named(capsys, tiny_model_dir, tmp_path, damage):
    for split in ("train", "test"):
        for label in ("neg", "pos"):
            folder = tmp_path / "aclImdb" / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                (folder / f"{i}_7.txt").write_text(f"a {label} review number {i}")
    damage(tmp_path / "aclImdb" / "test" / "pos" / "1_7.txt")
    err = cli_error(capsys, run_args(tiny_model_dir, tmp_path / "aclImdb", tmp_path / "out"))
    assert "1_7.txt is not UTF-8 text (byte 0x" in err


MODEL_DAMAGE = [("config.json", truncated), ("config.json", bit_flipped),
                ("config.json", emptied), ("config.json", utf16),
                ("tokenizer.json", truncated), ("tokenizer.json", emptied),
                ("model.safetensors", truncated), ("model.safetensors", lambda p: bit_flipped(p, 20)),
                ("model.safetensors", emptied)]


@pytest.mark.parametrize("name,damage", MODEL_DAMAGE,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(MODEL_DAMAGE)])
def test_damaged_model_directories_are_named(capsys, tiny_model_dir, sentiment_dir, tmp_path,
                                             name, damage):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    damage(model / name)
    err = cli_error(capsys, run_args(model, sentiment_dir, tmp_path / "out"))
    assert name in err
    err = cli_error(capsys, ["--predict", str(model), "a fine film"])
    assert name in err


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, sentiment_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    fe.main(run_args(tiny_model_dir, sentiment_dir, out, "--epochs", "1", "--keep", "2",
                     "--save-every", "20"))
    return out


def test_a_model_directory_damaged_after_it_was_written_is_found_by_its_checksum(
        capsys, finished_run, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(finished_run / "model", model)
    bit_flipped(model / "model.safetensors")  # in the tensor data: its structure still reads
    err = cli_error(capsys, ["--predict", str(model), "a fine film"])
    assert "model.safetensors is damaged: its checksum is not the one written with it" in err


def not_an_object(path):  # valid JSON, but not the flags the script wrote
    path.write_text("[1, 2]")


@pytest.mark.parametrize("damage", [truncated, bit_flipped, emptied, utf16, not_an_object])
def test_a_damaged_args_json_is_named(capsys, finished_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run / "args.json")
    err = cli_error(capsys, ["--resume", str(run), "--epochs", "2"])
    assert f"{run / 'args.json'} is not" in err


@pytest.mark.parametrize("record", ['{"changed": [1]}', '{"changed": {"epochs": 3}}', "[]"])
def test_a_damaged_resume_record_is_named(capsys, finished_run, tmp_path, record):
    """A line of resumes.jsonl that is JSON but not a resume record was a traceback."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "resumes.jsonl").write_text(record + "\n")
    err = cli_error(capsys, ["--resume", str(run), "--epochs", "2"])
    assert f"{run / 'resumes.jsonl'} is damaged (a line is not a resume record)" in err


@pytest.mark.parametrize("damage", [bit_flipped, lambda p: p.write_bytes("café".encode("latin-1"))])
def test_a_predict_file_that_is_not_utf8_is_named(capsys, finished_run, tmp_path, damage):
    reviews = tmp_path / "reviews.txt"
    reviews.write_text("a fine film\na dull one\n")
    damage(reviews)
    err = cli_error(capsys, ["--predict", str(finished_run / "model"), "--predict-file", str(reviews)])
    assert f"--predict-file {reviews} is not UTF-8 text" in err


def test_an_empty_predict_file_is_named(capsys, finished_run, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    err = cli_error(capsys, ["--predict", str(finished_run / "model"),
                             "--predict-file", str(tmp_path / "empty.txt")])
    assert f"--predict-file {tmp_path / 'empty.txt'} holds no text" in err


CHECKPOINT_DAMAGE = [(name, damage) for name in ("model.safetensors", "optimizer.safetensors",
                                                 "state.json")
                     for damage in (truncated, bit_flipped, emptied)]


@pytest.mark.parametrize("name,damage", CHECKPOINT_DAMAGE,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(CHECKPOINT_DAMAGE)])
def test_when_every_checkpoint_is_damaged_the_error_names_them(capsys, finished_run, tmp_path,
                                                               name, damage):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    checkpoints = fe.list_checkpoints(run)
    assert [c.name for c in checkpoints] == ["step-00000040", "step-00000050-end"]
    for checkpoint in checkpoints:
        damage(checkpoint / name)
    err = cli_error(capsys, ["--resume", str(run), "--epochs", "2"])
    assert "no intact checkpoint in" in err
    for checkpoint in checkpoints:
        assert f"{checkpoint.name}: {name}" in err


def test_a_full_disk_while_checkpointing_keeps_the_previous_one(monkeypatch, capsys, tiny_model_dir,
                                                                sentiment_dir, tmp_path):
    save_file, calls = fe.save_file, []

    def fills_the_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 2:  # the first checkpoint's two files fit, the second's do not
            raise OSError(28, "No space left on device")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(fe, "save_file", fills_the_disk)
    err = cli_error(capsys, run_args(tiny_model_dir, sentiment_dir, tmp_path, "--save-every", "10"))
    first = tmp_path / "checkpoints" / "step-00000010"
    assert (f"could not write checkpoint {tmp_path / 'checkpoints' / 'step-00000020'} "
            f"(No space left on device); the newest intact one is {first}") in err
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000010"]  # no .tmp
    assert fe.damaged_files(first) == []


def test_a_full_disk_while_saving_the_model_leaves_no_half_written_one(monkeypatch, capsys,
                                                                      tiny_model_dir,
                                                                      sentiment_dir, tmp_path):
    """Issue 37: model/ was written in place, so a write cut short left a model directory
    that --predict would read; it is written as a checkpoint is, and a resume writes it."""
    save_pretrained = transformers.PreTrainedModel.save_pretrained

    def fills_the_disk(model, folder, **kwargs):
        save_pretrained(model, folder, **kwargs)  # the weights fit, the tokenizer's files not
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", fills_the_disk)
    err = cli_error(capsys, run_args(tiny_model_dir, sentiment_dir, tmp_path, "--epochs", "1"))
    assert f"could not write the model to {tmp_path / 'model'} (No space left on device)" in err
    assert sorted(p.name for p in tmp_path.iterdir() if "model" in p.name) == []  # nor a .tmp
    monkeypatch.undo()
    fe.main(["--resume", str(tmp_path)])  # its last checkpoint is the end: the model is written
    assert fe.damaged_files(tmp_path / "model") == []
    assert (tmp_path / "model" / "checksums.json").is_file()
    assert len(fe.epoch_lines(fe.metric_lines(tmp_path))) == 1  # no epoch trained again


def test_texts_without_predict_are_refused_not_ignored(capsys, tmp_path):
    err = cli_error(capsys, ["a wonderful film", "--output-dir", str(tmp_path / "out")])
    assert "texts to classify (or --predict-file) need --predict MODEL_DIR" in err
    err = cli_error(capsys, ["--predict-file", "reviews.txt", "--output-dir", str(tmp_path / "out")])
    assert "need --predict MODEL_DIR" in err
    assert not (tmp_path / "out").exists()

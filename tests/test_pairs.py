"""Sentence pairs (issue 38): --text-column first,second tokenizes each pair as the tokenizer
does (token type ids 0 and 1), so a task whose label is in the second text alone is learned,
while the first text alone gives chance; --predict takes first<TAB>second, and the saved
model answers transformers' text-classification pipeline given text and text_pair."""

import random
from pathlib import Path

import pandas as pd
import pytest
from transformers import ElectraForSequenceClassification

import finetune_electra as fe
from conftest import FILLER, IPU_ARGS, assert_learned, run_args, sentiment_frame


def pairs_frame(n, seed):
    """first: filler words, with sentiment words of a coin's choosing; second: a review
    whose sentiment words decide the label."""
    second = sentiment_frame(n, seed)
    rng = random.Random(seed + 100)
    first = [" ".join(rng.choice(FILLER + ["great", "awful"]) for _ in range(rng.randint(3, 8)))
             for _ in range(n)]
    return pd.DataFrame({"first": first, "second": second["text"], "label": second["label"]})


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    pairs_frame(400, seed=0).to_parquet(out / "train.parquet")
    pairs_frame(200, seed=1).to_parquet(out / "test.parquet")
    return out


@pytest.fixture(scope="module")
def pair_run(tiny_model_dir, pairs_dir, tmp_path_factory):
    """Three epochs on the pairs, recording the token type ids the model was given."""
    out, seen = tmp_path_factory.mktemp("pair-run") / "run", []
    with pytest.MonkeyPatch.context() as patch:
        forward = ElectraForSequenceClassification.forward

        def recording(self, *args, **kwargs):
            seen.append(kwargs.get("token_type_ids"))
            return forward(self, *args, **kwargs)
        patch.setattr(ElectraForSequenceClassification, "forward", recording)
        metrics = fe.main(run_args(tiny_model_dir, pairs_dir, out, "--text-column", "first,second",
                                   "--epochs", "3"))  # 2 here: 0.52, then 1.0 in the second
    return metrics, out, seen


def test_a_pair_task_is_learned_from_the_second_text_with_its_token_types(pair_run):
    metrics, _, seen = pair_run
    assert_learned(metrics)
    assert all(t is not None for t in seen)  # every forward got them
    assert all(set(t.unique().tolist()) == {0, 1} for t in seen)  # the first text 0, the second 1


def test_the_first_text_alone_gives_chance(tiny_model_dir, pairs_dir, tmp_path):
    metrics = fe.main(run_args(tiny_model_dir, pairs_dir, tmp_path, "--text-column", "first"))
    assert max(m["accuracy"] for m in metrics) < 0.7  # 200 reviews: chance is 0.5 +- 0.035


def test_predict_takes_a_pair_and_the_pipeline_agrees(pair_run, capsys):
    from transformers import pipeline
    _, out, _ = pair_run
    first, second = "the movie was a film", "great wonderful superb loved it"
    fe.cli(["--predict", str(out / "model"), f"{first}\t{second}", f"{first}\tawful boring bad"])
    printed = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [row[0] for row in printed] == ["1", "0"]
    classify = pipeline("text-classification", model=str(out / "model"), device="cpu")
    answer = classify({"text": first, "text_pair": second})
    answer = answer[0] if isinstance(answer, list) else answer
    assert answer["label"] == "1" and answer["score"] == pytest.approx(float(printed[0][1]), abs=1e-3)


def test_predict_refuses_a_mix_of_pairs_and_single_texts(pair_run, capsys):
    _, out, _ = pair_run
    assert fe.cli(["--predict", str(out / "model"), "a\tb", "c"]) == 2
    assert "error: --predict: give every text as a pair (first<TAB>second), or none" in \
        capsys.readouterr().err


def test_pairs_reach_the_model_on_the_ipu_standin(fake_poptorch, monkeypatch, tiny_model_dir,
                                                 pairs_dir, tmp_path):
    seen, forward = [], ElectraForSequenceClassification.forward

    def recording(self, *args, **kwargs):
        seen.append(kwargs.get("token_type_ids"))
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(ElectraForSequenceClassification, "forward", recording)
    fe.main(run_args(tiny_model_dir, pairs_dir, tmp_path, *IPU_ARGS, "--epochs", "1",
                     "--text-column", "first,second"))
    assert seen and all(t is not None and t.max() == 1 for t in seen)


@pytest.mark.parametrize("argv, message", [
    (["--text-column", "first,second,label"], "error: --text-column first,second,label: one "
                                              "column, or two for sentence pairs (first,second)")])
def test_what_pairs_do_not_take_is_one_error_line(capsys, tiny_model_dir, pairs_dir, tmp_path,
                                                  argv, message):
    from conftest import cli_error
    argv = run_args(tiny_model_dir, pairs_dir, tmp_path / "run", "--text-column", "first,second",
                    *argv)
    assert cli_error(capsys, argv) == message
    assert not Path(tmp_path / "run").exists()

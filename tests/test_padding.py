"""Dynamic padding and length-grouped batches change speed, not what is computed."""

import numpy as np
import torch

import finetune_electra as fe
from conftest import sentiment_frame


def test_dynamic_padding_gives_the_same_logits_as_max_length(tiny_model_dir):
    from datasets import Dataset
    model, tokenizer = fe.load_model(str(tiny_model_dir), ["0", "1"])
    model.eval()
    ds = Dataset.from_pandas(sentiment_frame(12, seed=3))
    args = fe.parse_args(["--max-length", "64"])
    static = fe.Reviews(fe.tokenize(ds, tokenizer, args, "max_length"))
    dynamic = fe.Reviews(fe.tokenize(ds, tokenizer, args, False))
    lengths = dynamic.lengths.tolist()
    collate = fe.pad_collate(tokenizer.pad_token_id)
    batch_static, batch_dynamic = collate([static[i] for i in range(12)]), collate([dynamic[i] for i in range(12)])
    assert batch_static["input_ids"].shape == (12, 64)
    assert batch_dynamic["input_ids"].shape == (12, max(lengths)) and max(lengths) < 64
    with torch.no_grad():
        logits_static = model(input_ids=batch_static["input_ids"],
                              attention_mask=batch_static["attention_mask"]).logits
        logits_dynamic = model(input_ids=batch_dynamic["input_ids"],
                               attention_mask=batch_dynamic["attention_mask"]).logits
    torch.testing.assert_close(logits_dynamic, logits_static, rtol=1e-4, atol=1e-5)


def test_train_batches_see_every_sample_once_in_a_new_order_each_epoch():
    lengths = list(np.random.default_rng(0).integers(10, 500, size=1003))
    for grouped in (False, True):
        epochs = [fe.train_batches(lengths, 4, seed=1, epoch=e, group_by_length=grouped)
                  for e in range(2)]
        for batches in epochs:
            seen = [i for batch in batches for i in batch]
            assert len(batches) == 1003 // 4 and all(len(b) == 4 for b in batches)  # drop_last
            assert len(set(seen)) == len(seen) == 1000
        assert epochs[0] != epochs[1]
        assert epochs[0] == fe.train_batches(lengths, 4, seed=1, epoch=0, group_by_length=grouped)


def padding_fraction(batches, lengths):
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded


def test_grouping_by_length_cuts_padding():
    lengths = list(np.random.default_rng(0).integers(10, 500, size=2000))
    shuffled = fe.train_batches(lengths, 4, seed=1, epoch=0, group_by_length=False)
    grouped = fe.train_batches(lengths, 4, seed=1, epoch=0, group_by_length=True)
    assert padding_fraction(shuffled, lengths) > 0.3
    assert padding_fraction(grouped, lengths) < 0.02
    # the batches' order is still random: not sorted by length
    firsts = [lengths[b[0]] for b in grouped]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


def test_eval_batches_cover_every_sample_once_longest_first():
    lengths = [5, 50, 20, 40, 10, 30, 60]
    batches = fe.eval_batches(lengths, 3)
    assert batches == [[6, 1, 3], [5, 2, 4], [0]]

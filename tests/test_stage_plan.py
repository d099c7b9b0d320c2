import pytest
from transformers import (AutoModelForSequenceClassification, BertConfig, DistilBertConfig,
                          RobertaConfig)

import finetune_electra as fe
from conftest import tiny_electra


def test_tutorial_layout_for_12_layers_on_4_ipus():
    assert fe.layer_stages(12, 4) == [1] * 4 + [2] * 4 + [3] * 4


@pytest.mark.parametrize("layers, stages, expected", [
    (6, 4, [1, 1, 2, 2, 3, 3]),
    (5, 3, [1, 1, 1, 2, 2]),
    (4, 2, [1, 1, 1, 1]),
    (3, 1, [0, 0, 0]),
    (3, 4, [1, 2, 3]),
])
def test_layers_spread_evenly(layers, stages, expected):
    assert fe.layer_stages(layers, stages) == expected


def test_more_stages_than_layers_is_a_clear_error():
    with pytest.raises(fe.FinetuneError, match=r"5 stages need at least 4 encoder layers.*has 3"):
        fe.layer_stages(3, 5)


def test_electra_plan_matches_the_tutorial():
    model = tiny_electra(num_layers=12, embedding_size=16, hidden_size=32)
    plan = dict(fe.plan_stages(model, 4))
    assert plan["electra.embeddings"] == 0
    assert plan["electra.embeddings_project"] == 0  # ELECTRA's embedding -> hidden projection
    assert [plan[f"electra.encoder.layer.{i}"] for i in range(12)] == [1] * 4 + [2] * 4 + [3] * 4
    assert plan["classifier"] == 3
    assert len(plan) == 15


@pytest.mark.parametrize("config, base, layers, head", [
    (BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=6, num_attention_heads=2,
                intermediate_size=32), "bert", "bert.encoder.layer", ["bert.pooler", "classifier"]),
    (RobertaConfig(vocab_size=99, hidden_size=16, num_hidden_layers=6, num_attention_heads=2,
                   intermediate_size=32), "roberta", "roberta.encoder.layer", ["classifier"]),
    (DistilBertConfig(vocab_size=99, dim=16, n_layers=6, n_heads=2, hidden_dim=32),
     "distilbert", "distilbert.transformer.layer", ["pre_classifier", "classifier"]),
])
def test_plan_finds_the_parts_of_other_bert_family_models(config, base, layers, head):
    model = AutoModelForSequenceClassification.from_config(config)
    plan = fe.plan_stages(model, 3)
    assert plan[0] == (f"{base}.embeddings", 0)
    assert [s for n, s in plan if n.startswith(layers)] == [1, 1, 1, 2, 2, 2]
    assert [n for n, s in plan if s == 2 and not n.startswith(layers)] == head
    # every parameter is placed exactly once
    placed = sum(p.numel() for n, _ in plan for p in model.get_submodule(n).parameters())
    assert placed == sum(p.numel() for p in model.parameters())


def test_stage_table_lists_modules_and_parameters():
    model = tiny_electra(num_layers=12)
    table = fe.stage_table(model, fe.plan_stages(model, 4)).splitlines()
    assert table[0].split() == ["stage", "modules", "parameters"]
    assert table[1].split()[:3] == ["0", "electra.embeddings,", "electra.embeddings_project"]
    assert table[2].split()[:2] == ["1", "electra.encoder.layer.0-3"]
    assert table[4].split()[:3] == ["3", "electra.encoder.layer.8-11,", "classifier"]
    params = [int(line.split()[-1].replace(",", "")) for line in table[1:]]
    assert sum(params) == sum(p.numel() for p in model.parameters())

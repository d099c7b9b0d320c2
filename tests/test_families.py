"""Your model (issue 38, first part): tiny random classifiers of other families, saved with
save_pretrained beside the BERT tokenizer, train in one CPU process (no stage plan is made
where no stage is placed), and their stage plans put every weight on one stage, the blocks
spread between the embeddings and the head. A family this transformers lacks is skipped."""

import json

import pytest
import torch
import transformers

import finetune_electra as fe
from conftest import IPU_ARGS, minilm_dir, run_args

TINY = dict(vocab_size=30522, num_hidden_layers=3, num_attention_heads=2)
FAMILIES = {  # name: (config class, its settings), blocks' path under the base model
    "roberta": ("RobertaConfig", dict(**TINY, hidden_size=32, intermediate_size=64,
                                      max_position_embeddings=130, pad_token_id=0),
                "encoder.layer"),
    "distilbert": ("DistilBertConfig", dict(vocab_size=30522, dim=32, n_layers=3, n_heads=2,
                                            hidden_dim=64, max_position_embeddings=128),
                   "transformer.layer"),
    "deberta-v2": ("DebertaV2Config", dict(**TINY, hidden_size=32, intermediate_size=64,
                                           max_position_embeddings=128,  # as DeBERTa-v3's:
                                           relative_attention=True, pos_att_type=["p2c", "c2p"],
                                           position_biased_input=False, position_buckets=32,
                                           norm_rel_ebd="layer_norm"), "encoder.layer"),
    "modernbert": ("ModernBertConfig", dict(**TINY, hidden_size=32, intermediate_size=64,
                                            max_position_embeddings=128, pad_token_id=0,
                                            bos_token_id=101, eos_token_id=102,
                                            cls_token_id=101, sep_token_id=102), "layers"),
    "llama": ("LlamaConfig", dict(**TINY, hidden_size=32, intermediate_size=64,
                                  num_key_value_heads=2, max_position_embeddings=128), "layers"),
    "mistral": ("MistralConfig", dict(**TINY, hidden_size=32, intermediate_size=64,
                                      num_key_value_heads=2, max_position_embeddings=128),
                "layers"),
    "gpt2": ("GPT2Config", dict(vocab_size=30522, n_embd=32, n_layer=3, n_head=2,
                                n_positions=128), "h"),
    "albert": ("AlbertConfig", dict(**TINY, hidden_size=32, intermediate_size=64,
                                    embedding_size=16), None),  # one layer at every depth
}
SPLITTABLE = [family for family, (_, _, blocks) in FAMILIES.items() if blocks]


def tiny_classifier(family, **overrides):
    class_name, settings, _ = FAMILIES[family]
    if not hasattr(transformers, class_name):
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    torch.manual_seed(0)
    config = getattr(transformers, class_name)(**{**settings, **overrides}, num_labels=2)
    return transformers.AutoModelForSequenceClassification.from_config(config)


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """Each family's tiny classifier as a model directory, made once for the session."""
    made = {}

    def model_dir(family):
        if family not in made:
            out = tmp_path_factory.mktemp(family)
            tiny_classifier(family).save_pretrained(out)
            transformers.AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(out)
            made[family] = out
        return made[family]
    return model_dir


@pytest.mark.parametrize("family", SPLITTABLE)
def test_the_stage_plan_places_every_weight_once_blocks_between_embeddings_and_head(family):
    model = tiny_classifier(family)
    plan = fe.plan_stages(model, 3)
    prefix = f"{model.base_model_prefix}.{FAMILIES[family][2]}."
    blocks = [(name, stage) for name, stage in plan if name.startswith(prefix)]
    assert blocks == [(f"{prefix}{i}", stage) for i, stage in enumerate([1, 1, 2])]
    embeddings = plan[:plan.index(blocks[0])]  # the embeddings first, on stage 0
    assert embeddings and all(stage == 0 for _, stage in embeddings)
    assert [stage for _, stage in plan] == sorted(stage for _, stage in plan)  # forward order
    head = [name for name, _ in model.named_children() if name != model.base_model_prefix]
    assert {name for name, stage in plan if stage == 2} >= {h for h in head if any(
        True for _ in model.get_submodule(h).parameters())}
    placed = [p for name, _ in plan for p in model.get_submodule(name).parameters()]
    assert len({id(p) for p in placed}) == len(placed) == len(list(model.parameters()))


def test_albert_shares_its_layer_so_stages_are_refused_in_one_line():
    model = tiny_classifier("albert")
    with pytest.raises(fe.FinetuneError) as refused:
        fe.plan_stages(model, 2)
    assert str(refused.value) == ("AlbertForSequenceClassification runs 1 block at 3 depths "
                                  "(shared weights), which cannot be spread over pipeline "
                                  "stages: use --stages 1 (on IPUs, --ipus 1)")
    plan = fe.plan_stages(model, 1)  # the advice holds: one IPU takes every weight
    placed = [p for name, stage in plan for p in model.get_submodule(name).parameters()]
    assert {stage for _, stage in plan} == {0}
    assert len({id(p) for p in placed}) == len(placed) == len(list(model.parameters()))


@pytest.mark.parametrize("family", ["modernbert", "llama", "gpt2", "distilbert", "albert",
                                    "llama packed", "modernbert packed", "deberta-v2 packed"])
def test_each_family_trains_in_one_cpu_process(capsys, family_dirs, sentiment_dir, tmp_path,
                                               family):
    """Before: ModernBERT and the decoders stopped at once ('cannot find the encoder layers'),
    though one process places no stage. Packed: a decoder's rows are causal, its head reading
    each review's last token; ModernBERT's sliding layers get their band."""
    family, *packed = family.split()
    if packed and f"{FAMILIES[family][0][:-6]}ForSequenceClassification" not in \
            fe.PACKABLE_MODELS:
        pytest.skip(f"transformers {transformers.__version__}: no packing for {family}")
    out = tmp_path / "run"
    metrics = fe.main(run_args(family_dirs(family), sentiment_dir, out, "--epochs", "1",
                               "--train-samples", "64", "--eval-samples", "32",
                               *(["--padding", "packed"] if packed else [])))
    printed = capsys.readouterr().out
    assert "pipeline stage plan" not in printed and "Accuracy: " in printed
    assert len(metrics) == 1 and 0 <= metrics[0]["accuracy"] <= 1
    assert json.loads((out / "model" / "config.json").read_text())["pad_token_id"] == 0
    fe.cli(["--predict", str(out / "model"), "a great film", "an awful film"])
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


@pytest.mark.parametrize("family", SPLITTABLE)
def test_the_ipu_wrapper_gives_each_familys_own_logits_and_loss(fake_poptorch, family):
    """What the IPU graphs compute is the model's own: RoBERTa's positions, made by an integer
    cumsum PopTorch does not compile (the stand-in refuses it), come from the wrapper;
    DeBERTa's loss, which its own pick selects by nonzero, is the cross-entropy the script
    asks for at load (problem_type)."""
    model = tiny_classifier(family, pad_token_id=0).eval()
    input_ids = torch.tensor([[101, 2307, 2143, 102, 0, 0], [101, 9643, 102, 0, 0, 0]])
    labels, mask = torch.tensor([1, 0]), (input_ids != 0).long()
    own = model(input_ids=input_ids, attention_mask=mask, labels=labels)
    model.config.problem_type = "single_label_classification"  # as load_model asks
    loss, logits = fe.IPUWrapper(model)(input_ids, mask, labels)
    assert torch.equal(logits, own.logits) and torch.equal(loss, own.loss)


@pytest.mark.parametrize("family", ["roberta", "distilbert", "deberta-v2", "modernbert", "llama",
                                    "gpt2"])
def test_each_family_runs_the_ipu_flow_on_the_standin(fake_poptorch, family_dirs, sentiment_dir,
                                                      tmp_path, capsys, family):
    """BeginBlock on 2 stages, the tutorial's flow, against the PopTorch stand-in (not an IPU):
    the ops it traces are ones PopTorch compiles."""
    metrics = fe.main(run_args(family_dirs(family), sentiment_dir, tmp_path, *IPU_ARGS,
                               "--ipus", "2", "--epochs", "1"))
    printed = capsys.readouterr().out
    assert "pipeline stage plan (2 stages, applied with poptorch.BeginBlock)" in printed
    assert len(metrics) == 1 and 0 < metrics[0]["train_loss"] < 2

"""transformers' conventions on the TokenFormer models: one checkpoint in every head through the Auto
classes, the base model's hidden states and feature extraction, the sequence classifier (padding on
either side, the loss, Trainer, PEFT), `resize_token_embeddings` to any size saved and reloaded by
transformers and by this package, activation checkpointing through `GradientCheckpointingLayer` with
`every_n_layers`, `attn_implementation`, `compute_transition_scores`, and the forward arguments the
model refuses by name. Offline, CPU, tiny models (the directories of tests/test_hf.py)."""

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the hf extra)")

import tokenformer as tf  # noqa: E402
import tokenformer.hf as th  # noqa: E402
from tests.test_hf import EOS, VOCAB, decisive_model, ids  # noqa: E402
from tests.test_hf import hf_dir, native_dir, tokenizer  # noqa: E402,F401  (the fixtures)
from transformers import (AutoModel, AutoModelForCausalLM,  # noqa: E402
                          AutoModelForSequenceClassification)

pytestmark = pytest.mark.usefixtures("one_thread_module")


def logits_of(native: tf.TokenFormer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return native(x)[..., :native.config.vocab_size]


# ---- one checkpoint, every head ------------------------------------------------------------------

def test_one_checkpoint_loads_into_every_head_through_the_auto_classes(hf_dir, tmp_path):
    native = tf.TokenFormer.from_pretrained(hf_dir)
    x = ids(2, 10)
    base, info = AutoModel.from_pretrained(hf_dir, output_loading_info=True)
    assert type(base) is th.TokenFormerModel and base.base_model is base
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    classifier, info = AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=3,
                                                                         output_loading_info=True)
    assert type(classifier) is th.TokenFormerForSequenceClassification
    assert list(info["missing_keys"]) == ["score.weight"]  # the only new parameter
    with torch.no_grad():
        hidden = base(x).last_hidden_state  # (2, 10, 64)
        torch.testing.assert_close(hidden @ base.word_embeddings.weight[:VOCAB].T, logits_of(native, x))
    # the auto_map route names every head too
    remote = AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=3, trust_remote_code=True)
    assert type(remote).__name__ == "TokenFormerForSequenceClassification"
    assert set(json.loads((hf_dir / "config.json").read_text())["auto_map"]) == {
        "AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}

    # and back: a fine-tuned classifier's directory loads as a language model, a base model's in this package
    classifier.save_pretrained(tmp_path / "classifier")
    base.save_pretrained(tmp_path / "base")
    language_model = AutoModelForCausalLM.from_pretrained(tmp_path / "classifier")
    with torch.no_grad():
        torch.testing.assert_close(language_model(x).logits, logits_of(native, x))
    torch.testing.assert_close(logits_of(tf.load_model(tmp_path / "base"), x), logits_of(native, x))


def test_base_model_hidden_states_and_feature_extraction(hf_dir, tokenizer):
    from transformers import pipeline

    base = AutoModel.from_pretrained(hf_dir).eval()
    x = torch.tensor([list(b"feature")])
    with torch.no_grad():
        out = base(x, output_hidden_states=True)
    assert len(out.hidden_states) == base.config.num_hidden_layers + 1
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    torch.testing.assert_close(out.hidden_states[0], base.word_embeddings(x))  # the first block's input
    features = pipeline("feature-extraction", model=base, tokenizer=tokenizer)("feature", return_tensors=True)
    torch.testing.assert_close(features, out.last_hidden_state)


# ---- the sequence classifier ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier(hf_dir):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=3).eval()


@pytest.mark.parametrize("side", ["left", "right"])
def test_classifier_scores_each_rows_last_token_whatever_the_padding(classifier, hf_dir, side):
    rows = [list(b"short"), list(b"a longer text")]
    width = max(map(len, rows))
    pad = [[EOS] * (width - len(r)) for r in rows]
    batch = torch.tensor([p + r if side == "left" else r + p for r, p in zip(rows, pad)])
    mask = torch.tensor([[0] * len(p) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * len(p)
                         for r, p in zip(rows, pad)])
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        out = classifier(batch, attention_mask=mask, labels=labels)
        # independently: the base model's last hidden state of each row alone, times the score matrix
        base = AutoModel.from_pretrained(hf_dir)
        expected = torch.stack([base(torch.tensor([r])).last_hidden_state[0, -1] @ classifier.score.weight.T
                                for r in rows])
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    assert out.loss.item() == pytest.approx(F.cross_entropy(expected, labels).item(), abs=1e-5)


HEADS = {"causal-lm": AutoModelForCausalLM, "sequence-classification": AutoModelForSequenceClassification}


@pytest.mark.parametrize("head", HEADS)
def test_trainer_two_steps_per_head(hf_dir, tmp_path, head):
    from transformers import Trainer, TrainingArguments

    model = HEADS[head].from_pretrained(hf_dir, **({"num_labels": 2} if "classification" in head else {}))
    text = torch.tensor(list(b"parameters are tokens"))
    example = {"input_ids": text, "labels": text if head == "causal-lm" else torch.tensor(1)}
    with torch.no_grad():  # the first step's loss, computed here: every example is the same
        first = model(text[None], labels=example["labels"][None]).loss.item()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=[example] * 4)
    trainer.train()
    assert trainer.state.global_step == 2
    assert trainer.state.log_history[0]["loss"] == pytest.approx(first, rel=1e-4)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(before)  # every parameter trained, the classifier's score included


def test_peft_lora_on_a_sequence_classifier(hf_dir):
    peft = pytest.importorskip("peft", reason="peft is not installed (the hf extra)")

    base = AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=2)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=[],
                             target_parameters=["key_param_tokens", "value_param_tokens"])
    model = peft.get_peft_model(base, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "score" in n for n in trainable)
    assert any("score" in n for n in trainable)  # the new head trains in full (PEFT's modules_to_save)
    batch = torch.tensor([list(b"good"), list(b"bad!")])
    loss = model(input_ids=batch, labels=torch.tensor([1, 0])).loss
    loss.backward()
    assert all((p.grad is not None) == (n in trainable) for n, p in model.named_parameters())


# ---- resizing the vocabulary -------------------------------------------------------------------------

def test_resize_to_any_size_saves_reloads_and_generates_the_new_tokens(hf_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    # what this package wrote before the logits covered the tokens only: the padding rows suppressed
    model.generation_config.suppress_tokens = list(range(VOCAB, 384))
    model.resize_token_embeddings(300)  # not a multiple of make_vocab_size_divisible_by (128)
    assert model.word_embeddings.weight.shape[0] == 300 and model.config.vocab_size == 300
    assert model.config.padded_vocab_size == 300 and model.generation_config.suppress_tokens is None
    prompt = torch.tensor([list(b"new token")])
    with torch.no_grad():  # make token 299, a new one, the clear next token
        last = model(prompt, output_hidden_states=True).hidden_states[-1][0, -1]
        model.word_embeddings.weight[299] = 50 * last / last.norm()
    assert model.generate(prompt, max_new_tokens=1, do_sample=False)[0, -1].item() == 299

    model.save_pretrained(tmp_path / "300")
    x = ids(2, 8)
    with torch.no_grad():
        expected = model(x).logits
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "300")(x).logits, expected)
    native = tf.load_model(tmp_path / "300")  # this package's loader reads the resized directory as it is
    assert native.config.vocab_size == 300
    torch.testing.assert_close(logits_of(native, x), expected)

    model.resize_token_embeddings(400, pad_to_multiple_of=64)  # 400 tokens in 448 rows
    assert model.word_embeddings.weight.shape[0] == 448 and model.config.vocab_size == 400
    model.save_pretrained(tmp_path / "400")
    with torch.no_grad():
        expected = model(x).logits
        assert expected.shape[-1] == 400
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "400")(x).logits, expected)
    assert tf.load_model(tmp_path / "400").config.padded_vocab_size == 448
    torch.testing.assert_close(logits_of(tf.load_model(tmp_path / "400"), x), expected)


def test_compute_transition_scores_are_the_log_probabilities_of_the_chosen_tokens(hf_dir, tokenizer):
    """transformers' generic code reads config.vocab_size as the logits' width (here the scores of
    the second row start at vocab_size)."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    native = tf.TokenFormer.from_pretrained(hf_dir)
    prompts = [list(b"ab"), list(b"cd")]
    out = model.generate(torch.tensor(prompts), max_new_tokens=3, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, eos_token_id=None)
    scores = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)  # (2, 3)
    for row, prompt in enumerate(prompts):
        sequence = out.sequences[row].tolist()
        for step in range(3):
            context = torch.tensor([sequence[:len(prompt) + step]])
            log_probs = torch.log_softmax(logits_of(native, context)[0, -1], dim=-1)
            assert scores[row, step].item() == pytest.approx(log_probs[sequence[len(prompt) + step]].item(), abs=1e-5)


# ---- activation checkpointing ------------------------------------------------------------------------

def test_activation_checkpointing_honours_every_n_layers(native_dir):
    from transformers.modeling_layers import GradientCheckpointingLayer

    config = th.TokenFormerConfig.from_native(tf.Config.from_name("tiny", num_layers=3, seq_length=32))
    torch.manual_seed(0)
    reference = th.TokenFormerForCausalLM(config).train()
    x = ids(2, 10)
    reference(x, labels=x).loss.backward()
    for every_n_layers, recomputed in [(1, [2, 2, 2]), (2, [2, 1, 2])]:
        model = th.TokenFormerForCausalLM(config).train()
        model.load_state_dict(reference.state_dict())
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable(every_n_layers=every_n_layers)
        assert all(isinstance(block, GradientCheckpointingLayer) for block in model.layers)
        calls = [0] * 3
        for i, block in enumerate(model.layers):  # the attention runs again when its block is recomputed
            block.attention.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        model(x, labels=x).loss.backward()
        assert calls == recomputed, every_n_layers
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    with pytest.raises(tf.TokenFormerError, match="a cache cannot be used while training with activation"):
        model(x, cache=transformers.DynamicCache(config=config))


# ---- attn_implementation and forward arguments ---------------------------------------------------------

def test_attn_implementation_is_sdpa_or_refused_by_name(hf_dir):
    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    for name in ("eager", "flex_attention"):
        with pytest.raises(tf.TokenFormerError, match=f'attn_implementation="{name}" is not supported'):
            AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation=name)
    with pytest.raises(tf.TokenFormerError, match='attn_implementation="eager" is not supported'):
        model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "sdpa"


def test_forward_refuses_what_it_cannot_use_by_name(hf_dir):
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    cache = transformers.DynamicCache(config=model.config)
    x = ids(1, 4)
    with pytest.raises(tf.TokenFormerError, match="does not use token_type_ids: leave it out"):
        model(x, token_type_ids=torch.zeros_like(x))
    with pytest.raises(tf.TokenFormerError, match="two caches were given"):
        model(x, cache=cache, past_key_values=transformers.DynamicCache(config=model.config))
    model(x, cache=cache)
    model(x[:, :1], cache=cache, cache_position=torch.tensor([4]))  # where the cache ends: fine
    with pytest.raises(tf.TokenFormerError, match=r"cache_position \[2\] does not follow the 5 cached positions"):
        model(x[:, :1], cache=cache, cache_position=torch.tensor([2]))


def test_a_model_without_padding_rows_keeps_none(tmp_path):
    """The byte tokenizer's 257 tokens in 257 rows: every row is a token, the logits cover them all."""
    decisive_model(make_vocab_size_divisible_by=1).save_pretrained(tmp_path / "native", tokenizer=tf.ByteTokenizer())
    model = th.TokenFormerForCausalLM.from_pretrained(tmp_path / "native")
    assert model.word_embeddings.weight.shape[0] == model.config.vocab_size == VOCAB
    with torch.no_grad():
        assert model(ids(1, 3)).logits.shape == (1, 3, VOCAB)


def test_shift_labels_are_the_targets_already_shifted(hf_dir):
    """What transformers' Trainer hands a causal LM under context parallelism: position t predicts
    shift_labels[t]; they take the place of labels."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    x = ids(2, 9)
    shifted = torch.cat([x[:, 1:], torch.full((2, 1), -100)], dim=1)  # the last position predicts nothing
    with torch.no_grad():
        logits = model(x).logits
        expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        assert model(x, shift_labels=shifted).loss.item() == pytest.approx(expected.item(), abs=1e-6)
        other = ids(2, 9, seed=7)  # labels are ignored when shift_labels are given
        assert model(x, labels=other, shift_labels=shifted).loss.item() == pytest.approx(expected.item(), abs=1e-6)

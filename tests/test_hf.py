"""The transformers integration (`tokenformer.hf`) against the native model: the same logits from the
same directory by both loading routes; greedy, seeded sampled and beam `generate` equal to the native
generation (or to a beam search written here over the native model), batched with left padding and
unbatched, with and without the cache; the loss, training, lm-eval's own `hf` model against
`tokenformer-lm-eval`, PEFT LoRA on the parameter tokens, and one sentence for each mistake a user can
make. Offline, CPU, tiny models. The base model, the classifier, resizing, checkpointing and
`attn_implementation`: tests/test_hf_heads.py."""

import atexit
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Never the network; dynamic modules (trust_remote_code) and datasets in a private cache.
_CACHE = tempfile.mkdtemp(prefix="tokenformer-test-hf-")
atexit.register(shutil.rmtree, _CACHE, True)
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": os.path.join(_CACHE, "datasets"), "HF_MODULES_CACHE": os.path.join(_CACHE, "modules")}
os.environ.update(OFFLINE)

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the hf extra)")

import tokenformer as tf  # noqa: E402
import tokenformer.hf as th  # noqa: E402
from tokenformer.__main__ import main as cli  # noqa: E402
from tokenformer.evaluation.scoring import mean_loss, next_token_loss  # noqa: E402
from tokenformer.generate import generate_batch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

SEQ = 48  # the longest prompt (26 bytes) and 12 new tokens fit: no generation cuts a prompt
EOS = 256  # the byte tokenizer's <|endoftext|>
VOCAB = 257
PROMPTS = ["a", "the cat sat", "hello there, my old friend"]  # 1, 11 and 26 bytes: three widths


pytestmark = pytest.mark.usefixtures("one_thread_module")


def decisive_model(seed: int = 0, **overrides) -> tf.TokenFormer:
    """A tiny model with large random weights: its next-token distributions are peaked, so greedy
    decoding has clear winners (a default-initialised model is nearly uniform), and they depend on
    the context, not only on the last token (with values of std 0.1 they did not: a generation that
    lost its cache gave the same tokens)."""
    torch.manual_seed(seed)
    model = tf.TokenFormer(tf.Config.from_name("tiny", seq_length=SEQ, **overrides)).eval()
    with torch.no_grad():
        model.word_embeddings.weight.normal_(0, 0.5)
        for pattention in model.pattentions().values():
            pattention.key_param_tokens.normal_(0, 0.3)
            pattention.value_param_tokens.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("native")
    decisive_model().save_pretrained(directory, tokenizer=tf.ByteTokenizer())
    return directory


@pytest.fixture(scope="module")
def hf_dir(native_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "tiny-tokenformer"
    assert cli(["convert", str(native_dir), str(directory), "--format", "hf"]) == 0
    return directory


@pytest.fixture(scope="module")
def unpadded_hf_dir(tmp_path_factory):
    """A model whose embedding has no padding rows (257 rows for 257 tokens)."""
    native_directory = tmp_path_factory.mktemp("native-unpadded")
    decisive_model(seed=5, make_vocab_size_divisible_by=1).save_pretrained(native_directory, tokenizer=tf.ByteTokenizer())
    directory = tmp_path_factory.mktemp("hf-unpadded") / "tiny-unpadded"
    assert cli(["convert", str(native_directory), str(directory), "--format", "hf"]) == 0
    return directory


@pytest.fixture(scope="module")
def native(hf_dir):
    return tf.TokenFormer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def model(hf_dir):
    return AutoModelForCausalLM.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(hf_dir):
    return AutoTokenizer.from_pretrained(hf_dir)


def ids(*shape, seed=1):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# ---- the directory and the two loading routes ---------------------------------------------------

def test_the_directory_holds_what_transformers_and_this_package_read(hf_dir):
    assert {p.name for p in hf_dir.iterdir()} >= {
        "config.json", "model.safetensors", "modeling_tokenformer.py", "generation_config.json",
        "tokenizer.json", "tokenizer_config.json"}
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "tokenformer" and config["architectures"] == ["TokenFormerForCausalLM"]
    assert config["auto_map"] == th.AUTO_MAP
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (EOS, EOS, EOS)
    assert config["num_layers"] == 2 and config["padded_vocab_size"] == 384  # every field, not a diff
    assert config["vocab_size"] == VOCAB
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    # nothing to suppress: the logits cover the tokens only, never the embedding's padding rows
    assert generation["eos_token_id"] == EOS and generation.get("suppress_tokens") is None


def test_registered_route_gives_the_native_logits(native_dir, native, model):
    assert type(model) is th.TokenFormerForCausalLM
    x = ids(3, 20)
    with torch.no_grad():
        # the logits of the tokens: the native model's first vocab_size columns (of padded_vocab_size)
        assert native(x).shape[-1] == 384 and model(x).logits.shape[-1] == VOCAB == model.config.vocab_size
        assert (model(x).logits - native(x)[..., :VOCAB]).abs().max() <= 1e-6
        # our own directory format (no transformers keys) loads into the transformers class too
        ours = th.TokenFormerForCausalLM.from_pretrained(native_dir)
        assert (ours(x).logits - native(x)[..., :VOCAB]).abs().max() <= 1e-6
    assert model.state_dict().keys() == native.state_dict().keys()


def test_trust_remote_code_route_in_a_fresh_process(hf_dir, native, tmp_path):
    """Without `import tokenformer.hf`: config.json's auto_map and the modeling file find the classes."""
    x = ids(2, 12)
    torch.save(x, tmp_path / "ids.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
assert "tokenformer.hf" not in sys.modules
model = AutoModelForCausalLM.from_pretrained({str(hf_dir)!r}, trust_remote_code=True)
assert any(name.endswith("modeling_tokenformer") for name in sys.modules), "the modeling file was not used"
tokenizer = AutoTokenizer.from_pretrained({str(hf_dir)!r}, trust_remote_code=True)
assert tokenizer("héllo").input_ids == list("héllo".encode())
with torch.no_grad():
    torch.save(model(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'logits.pt')!r})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **OFFLINE})
    assert result.returncode == 0, result.stderr[-2000:]
    with torch.no_grad():
        assert (torch.load(tmp_path / "logits.pt") - native(x)[..., :VOCAB]).abs().max() <= 1e-6


def test_convert_an_official_checkpoint_to_the_hf_format(tmp_path):
    from tests.test_model import CFG, official_random_state

    config = tf.Config(**{**CFG, "vocab_size": VOCAB})
    state = official_random_state(config, dtype=torch.float16)
    torch.save(state, tmp_path / "pytorch_model.bin")
    config.to_json(tmp_path / "official.json")
    assert cli(["convert", str(tmp_path / "pytorch_model.bin"), str(tmp_path / "hf"), "--format", "hf",
                "--config", str(tmp_path / "official.json"), "--tokenizer", "byte"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.dtype == torch.float32 and model.config.eos_token_id == EOS
    x = ids(2, 9)
    with torch.no_grad():
        assert (model(x).logits - tf.load_official(state, config)(x)[..., :VOCAB]).abs().max() <= 1e-6


def test_our_loader_reads_directories_transformers_saved(native_dir, model, tmp_path):
    saved = tmp_path / "saved"
    model.save_pretrained(saved)  # what a user does after fine-tuning
    assert (saved / "modeling_tokenformer.py").is_file()
    assert json.loads((saved / "config.json").read_text())["auto_map"] == th.AUTO_MAP
    reference = tf.TokenFormer.from_pretrained(native_dir)
    loaded = tf.load_model(saved)
    assert loaded.config == reference.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_tokenizer_is_the_models_tokenizer(hf_dir, tokenizer):
    text = "Grüße, world"
    assert tokenizer(text).input_ids == tf.ByteTokenizer().encode(text)
    assert tokenizer.decode(tf.ByteTokenizer().encode(text)) == text
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.padding_side) == (EOS, EOS, "left")
    assert isinstance(tf.load_tokenizer(hf_dir), tf.ByteTokenizer)  # tokenizer.json unchanged for us


def test_config_mirrors_the_native_config():
    native_defaults = tf.Config()
    config = th.TokenFormerConfig()
    assert config.to_native() == native_defaults
    assert (config.num_hidden_layers, config.max_position_embeddings, config.layer_norm_eps) == (12, 2048, 1e-5)
    assert (config.padded_vocab_size, config.head_dim, config.rotary_dim) == (50304, 64, 16)
    grown = tf.Config.from_name("tiny", ffn_scale_num=64)
    assert th.TokenFormerConfig.from_native(grown).to_native() == grown


# ---- the forward pass: cache, masks, logits_to_keep ----------------------------------------------

@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])  # the newer name and the older
def test_dynamic_cache_pieces_equal_the_full_forward(model, keyword):
    from transformers import DynamicCache

    x = ids(2, 15)
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        pieces = [model(x[:, :6], **{keyword: cache}).logits, model(x[:, 6:10], **{keyword: cache}).logits]
        out = model(x[:, 10:11], **{keyword: cache})
        assert out[th.modeling.CACHE_FIELD] is cache  # handed back under the installed transformers' name
        pieces += [out.logits] + [model(x[:, t:t + 1], **{keyword: cache}).logits for t in range(11, 15)]
    assert cache.get_seq_length() == 15
    # float32 rounding, relative to the logits' scale (tens: the decisive model's weights are large)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5 * full.abs().max().item())


def test_left_padding_under_the_mask_equals_the_unpadded_row(model, native):
    short, long = ids(1, 5, seed=2), ids(1, 9, seed=3)
    batch = torch.cat([torch.cat([torch.full((1, 4), EOS), short], dim=1), long])  # (2, 9)
    mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        torch.testing.assert_close(padded[0, 4:], native(short)[0, :, :VOCAB], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded[1], native(long)[0, :, :VOCAB], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(native(batch, attention_mask=mask)[..., :VOCAB], padded, rtol=0, atol=0)


def test_logits_to_keep_and_hidden_states(model):
    x = ids(2, 8)
    with torch.no_grad():
        full = model(x).logits
        torch.testing.assert_close(model(x, logits_to_keep=1).logits, full[:, -1:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x, logits_to_keep=torch.tensor([0, 5])).logits, full[:, [0, 5]],
                                   rtol=1e-5, atol=1e-5)
        out = model(x, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_layers + 1
    torch.testing.assert_close(out.hidden_states[-1] @ model.word_embeddings.weight[:VOCAB].T, full)


# ---- generation -------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["padded", "unpadded"])
def pair(request, hf_dir, unpadded_hf_dir):
    """(transformers model, native model) from one directory: 257 tokens in 384 embedding rows, or in 257."""
    directory = hf_dir if request.param == "padded" else unpadded_hf_dir
    return AutoModelForCausalLM.from_pretrained(directory).eval(), tf.TokenFormer.from_pretrained(directory)


def hf_generate(model, tokenizer, prompts, **options):
    """The new tokens `generate` gives each prompt (left-padded together when several), cut at the
    first end of text as the native generation stops."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=12, **options)[:, batch.input_ids.shape[1]:].tolist()
    return [row[:row.index(EOS)] if EOS in row else row for row in out]


def native_generate(native, prompts, **options):
    encoded = [list(p.encode()) for p in prompts]
    if len(prompts) == 1:
        return [list(tf.generate_tokens(native, encoded[0], 12, eos_id=EOS, vocab_size=VOCAB, **options))]
    return generate_batch(native, encoded, 12, eos_id=EOS, vocab_size=VOCAB, pad_id=EOS, **options)


@pytest.mark.parametrize("prompts", [PROMPTS[1:2], PROMPTS], ids=["unbatched", "left-padded"])
def test_greedy_generate_equals_native_greedy(pair, tokenizer, prompts):
    model, native = pair
    expected = native_generate(native, prompts)
    assert hf_generate(model, tokenizer, prompts, do_sample=False) == expected
    assert hf_generate(model, tokenizer, prompts, do_sample=False, use_cache=False) == expected  # cache or none
    assert any(len(row) >= 6 for row in expected)  # the comparison covers decoding steps, not only an early end


@pytest.mark.parametrize("prompts", [PROMPTS[2:], PROMPTS], ids=["unbatched", "left-padded"])
def test_seeded_sampling_equals_native_sampling(unpadded_hf_dir, tokenizer, prompts):
    """The same draws from the same seed: transformers samples from the global generator, the native
    generation from its own seeded one (the same stream). On the model without padding rows, where
    both draw over the same 257 logits (the native generation draws over the padded width)."""
    model = AutoModelForCausalLM.from_pretrained(unpadded_hf_dir).eval()
    native = tf.TokenFormer.from_pretrained(unpadded_hf_dir)
    outputs = []
    for seed in (3, 4):
        options = dict(temperature=0.9, top_k=40)
        transformers.set_seed(seed)
        ours = hf_generate(model, tokenizer, prompts, do_sample=True, top_p=1.0, **options)
        assert ours == native_generate(native, prompts, seed=seed, **options)
        outputs.append(ours)
    assert outputs[0] != outputs[1]  # the seed matters


def reference_beam_search(native, prompt: list[int], num_beams: int, steps: int) -> list[int]:
    """Beam search written out over the native model (every step recomputes every beam, no cache): the
    `num_beams` continuations of the highest summed log-probability over the tokens, extended one
    token per step; no end of text. Returns the best continuation."""
    beams = [([], 0.0)]
    for _ in range(steps):
        with torch.no_grad():
            batch = torch.tensor([prompt + tokens for tokens, _ in beams])
            log_probs = torch.log_softmax(native(batch)[:, -1, :VOCAB].double(), dim=-1)  # (beams, V)
        candidates = [(tokens + [t], score + log_probs[b, t].item())
                      for b, (tokens, score) in enumerate(beams) for t in range(VOCAB)]
        beams = sorted(candidates, key=lambda c: -c[1])[:num_beams]
    return beams[0][0]


@pytest.mark.parametrize("prompts", [PROMPTS[1:2], PROMPTS], ids=["unbatched", "left-padded"])
def test_beam_search_equals_a_reference_beam_search(pair, tokenizer, prompts):
    model, native = pair
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    # no end-of-text token: every beam runs the 6 steps, as in the reference
    out = model.generate(**batch, max_new_tokens=6, num_beams=3, do_sample=False, eos_token_id=None,
                         length_penalty=0.0)[:, batch.input_ids.shape[1]:].tolist()
    assert out == [reference_beam_search(native, list(p.encode()), 3, 6) for p in prompts]


def test_pipeline_text_generation(model, tokenizer, native):
    from transformers import pipeline

    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out, = generator("the cat", max_new_tokens=8, do_sample=False)
    continuation = tf.ByteTokenizer().decode(tf.generate_tokens(native, list(b"the cat"), 8, eos_id=EOS,
                                                                vocab_size=VOCAB))
    assert out["generated_text"] == "the cat" + continuation


# ---- loss and training --------------------------------------------------------------------------

def unpadded_window_loss(model, batch):
    return next_token_loss(model(batch[:, :-1]), batch[:, 1:], vocab_size=VOCAB), batch[:, 1:].numel()


def test_labels_loss_equals_the_native_mean_next_token_loss(model, native):
    windows = ids(3, 17, seed=4)
    loss = model(windows, labels=windows).loss
    assert loss.item() == pytest.approx(mean_loss(native, [windows], loss_fn=unpadded_window_loss), abs=1e-6)
    # padding: masked, labels -100, the loss is the token-weighted mean of the rows' own losses
    short = windows[0, :9]
    batch = torch.stack([torch.cat([torch.full((8,), EOS), short]), windows[1]])
    mask = (torch.arange(17) >= 8).long()[None].expand(2, -1).clone()
    mask[1] = 1
    labels = batch.masked_fill(mask == 0, -100)
    labels[0, 8] = -100  # a row's first token has no context to be predicted from
    expected = mean_loss(native, [short[None], windows[1:2]], loss_fn=unpadded_window_loss)
    assert model(batch, attention_mask=mask, labels=labels).loss.item() == pytest.approx(expected, abs=1e-6)


def test_trainer_with_activation_checkpointing_lowers_the_loss(hf_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    text = torch.tensor([list(b"pattention attends over parameter tokens. " * 2)[:SEQ]])
    data = [{"input_ids": text[0], "labels": text[0]}] * 4
    before = model(text, labels=text).loss.item()
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (the old name still works)
    checkpointing = "activation_checkpointing" if hasattr(TrainingArguments, "activation_checkpointing") \
        else "gradient_checkpointing"
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=2,
                             learning_rate=3e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=4,
                             disable_tqdm=True, **{checkpointing: True})
    Trainer(model=model, args=args, train_dataset=data).train()
    assert model.gradient_checkpointing
    model.eval()
    assert model(text, labels=text).loss.item() < 0.7 * before


def test_activation_checkpointing_gives_the_same_gradients(hf_dir):
    x = ids(2, 10)
    grads = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(hf_dir).train()
        if checkpointing:  # the 5.2x name, or the one before
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
            assert model.gradient_checkpointing
        model(x, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad)


# ---- lm-eval's own `hf` model ---------------------------------------------------------------------

def write_tasks(folder: Path, data: Path) -> None:
    """A multiple-choice task, a LAMBADA-style loglikelihood task and a rolling (perplexity) task."""
    choices = [{"question": "Which animal barks?", "choices": ["dog", "cat", "fish"], "answer": 0},
               {"question": "Two plus two is", "choices": ["three", "four"], "answer": 1}]
    texts = ["the cat sat on the mat and looked at the dog", "a dog ran far away from home",
             "pattention layers attend over parameter tokens instead of weights"]
    (data / "choice.jsonl").write_text("".join(json.dumps(c) + "\n" for c in choices))
    (data / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "hf_choice.yaml").write_text(
        f"task: hf_choice\n{common}dataset_kwargs:\n  data_files:\n    test: {data / 'choice.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: choices\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "hf_lambada.yaml").write_text(
        f"task: hf_lambada\n{common}dataset_kwargs:\n  data_files:\n    test: {data / 'texts.jsonl'}\n"
        "output_type: loglikelihood\ndoc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "hf_rolling.yaml").write_text(
        f"task: hf_rolling\n{common}dataset_kwargs:\n  data_files:\n    test: {data / 'texts.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n")


TASKS = ["hf_choice", "hf_lambada", "hf_rolling"]


def test_lm_eval_hf_model_equals_tokenformer_lm_eval(unpadded_hf_dir, tmp_path, monkeypatch):
    """`lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True` (lm-eval's command
    line) gives the per-request log-likelihoods and the metrics of the `tokenformer` model. On a model
    without padding rows: `tokenformer-lm-eval` normalises over the padded vocabulary as the official
    harness did, the transformers model over the tokens (docs/transformers.md)."""
    hf_dir = unpadded_hf_dir
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (the eval extra)")
    import functools

    import lm_eval.__main__
    import lm_eval.tasks
    from lm_eval import simple_evaluate

    from tokenformer.evaluation.lm_eval import TokenFormerLM

    (tmp_path / "tasks").mkdir()
    (tmp_path / "data").mkdir()
    write_tasks(tmp_path / "tasks", tmp_path / "data")
    # Only to save the ~10 s of indexing lm-eval's own tasks: the command line is lm-eval's.
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager,
                                                                        include_defaults=False))
    monkeypatch.setattr(lm_eval.__main__, "setup_logging", lambda: None)
    monkeypatch.setattr(sys, "argv", ["lm_eval", "--model", "hf", "--model_args",
                                      f"pretrained={hf_dir},trust_remote_code=True,dtype=float32",
                                      "--tasks", ",".join(TASKS), "--include_path", str(tmp_path / "tasks"),
                                      "--device", "cpu", "--batch_size", "2", "--log_samples",
                                      "--output_path", str(tmp_path / "out")])
    lm_eval.__main__.cli_evaluate()
    results, = (tmp_path / "out").rglob("results_*.json")
    hf_metrics = json.loads(results.read_text())["results"]

    manager = lm_eval.tasks.TaskManager(include_path=str(tmp_path / "tasks"))
    ours = simple_evaluate(model=TokenFormerLM(pretrained=str(hf_dir), batch_size=3), tasks=TASKS,
                           task_manager=manager, log_samples=True, bootstrap_iters=0)
    for task in TASKS:
        samples, = (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")
        hf_samples = {s["doc_id"]: s for s in map(json.loads, samples.read_text().splitlines())}
        assert len(hf_samples) == len(ours["samples"][task]) > 0
        for sample in ours["samples"][task]:
            theirs = hf_samples[sample["doc_id"]]["resps"]
            assert len(theirs) == len(sample["resps"])
            for (a,), (b,) in zip(sample["resps"], theirs):
                a, b = (a, b) if isinstance(a, (list, tuple)) else ((a,), (b,))
                # lm-eval's hf model sums log-probabilities in float32: 1e-5, or float32's resolution
                # (1e-7 relative) for the totals of whole texts, which reach -200 nats here
                assert float(b[0]) == pytest.approx(float(a[0]), abs=1e-5, rel=1e-7)
                if len(a) > 1:
                    assert str(b[1]) == str(a[1])  # is_greedy
        for metric, value in ours["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert hf_metrics[task][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, metric)


# ---- PEFT: LoRA on the parameter tokens -------------------------------------------------------------

def test_peft_lora_on_parameter_tokens_trains_and_merges(hf_dir):
    peft = pytest.importorskip("peft", reason="peft is not installed (the hf extra)")

    base = AutoModelForCausalLM.from_pretrained(hf_dir)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[],
                             target_parameters=["key_param_tokens", "value_param_tokens"])
    model = peft.get_peft_model(base, config)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 5 * base.config.num_layers  # A and B, keys and values, 5 Pattentions

    text = torch.tensor([list(b"tokens are parameters, parameters are tokens. ")[:SEQ]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=text, labels=text).loss
        loss.backward()
        losses.append(loss.item())
        assert all((p.grad is not None) == ("lora_" in n) for n, p in model.named_parameters())
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.8 * losses[0]

    model.eval()
    x = ids(2, 12)
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        merged = model.merge_and_unload()
        assert type(merged) is th.TokenFormerForCausalLM
        assert merged.state_dict().keys() == tf.TokenFormer.from_pretrained(hf_dir).state_dict().keys()
        torch.testing.assert_close(merged(x).logits, adapted, rtol=1e-5, atol=1e-5)
        assert (merged(x).logits - AutoModelForCausalLM.from_pretrained(hf_dir)(x).logits).abs().max() > 1e-3


# ---- the documentation's examples ---------------------------------------------------------------

def test_the_examples_of_docs_transformers_md_run(hf_dir, tmp_path):
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "transformers.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 5  # load (two routes), generate, classify, PEFT
    for block in blocks:
        code = block.replace("ckpt/150M-hf", str(hf_dir)).replace("ckpt/150M-lora-merged", str(tmp_path / "merged"))
        exec(compile(code, "docs/transformers.md", "exec"), {})
    merged = tf.TokenFormer.from_pretrained(tmp_path / "merged")
    assert merged.state_dict().keys() == tf.TokenFormer.from_pretrained(hf_dir).state_dict().keys()


# ---- mistakes a user can make: one sentence each ----------------------------------------------

def test_a_directory_of_another_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(tf.TokenFormerError, match="describes a 'gpt2' model, not a TokenFormer"):
        th.TokenFormerForCausalLM.from_pretrained(tmp_path)
    vision = tmp_path / "vision"
    tf.VisionTokenFormer(tf.VisionConfig.from_name("tiny-28")).save_pretrained(vision)
    with pytest.raises(tf.TokenFormerError, match="not a TokenFormer language model"):
        th.TokenFormerConfig.from_pretrained(vision)


def forget_tokenformer_hf(monkeypatch) -> None:
    """Make the next import of tokenformer.hf run its code again (as in a new process)."""
    for name in [n for n in sys.modules if n == "tokenformer.hf" or n.startswith("tokenformer.hf.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(tf, "hf", raising=False)  # `from tokenformer import hf` would find it there


def fresh_import_of_tokenformer_hf(monkeypatch):
    forget_tokenformer_hf(monkeypatch)
    return importlib.import_module("tokenformer.hf")


def test_a_missing_extra_and_a_too_old_transformers_are_one_sentence(monkeypatch):
    with monkeypatch.context() as patch:
        # sys.modules' own entry: importing transformers.pipeline replaces the module object there
        patch.setattr(sys.modules["transformers"], "__version__", "4.57.1")
        with pytest.raises(tf.TokenFormerError, match=r"transformers 4\.57\.1 is too old for tokenformer.hf, "
                                                      r"which needs 5\.23\.0 or newer: pip install"):
            fresh_import_of_tokenformer_hf(patch)
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "transformers", None)  # what an environment without it sees
        with pytest.raises(tf.TokenFormerError, match=r'needs the "hf" extra: pip install "tokenformer\[hf\]"'):
            fresh_import_of_tokenformer_hf(patch)
    assert sys.modules["tokenformer.hf"] is th and tf.hf is th  # the real module is back


def test_convert_to_hf_errors_are_one_line(native_dir, tmp_path, capsys, monkeypatch):
    bare = tmp_path / "bare"
    tf.TokenFormer(tf.Config.from_name("tiny")).save_pretrained(bare)  # no tokenizer.json
    assert cli(["convert", str(bare), str(tmp_path / "o"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--format hf needs the model's tokenizer" in err
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "transformers", None)
        forget_tokenformer_hf(patch)
        assert cli(["convert", str(native_dir), str(tmp_path / "o2"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "tokenformer[hf]"' in err


def test_unsupported_forward_arguments_are_one_sentence(model):
    from transformers import StaticCache

    x = ids(1, 4)
    with pytest.raises(tf.TokenFormerError, match="output_attentions is not supported"):
        model(x, output_attentions=True)
    with pytest.raises(tf.TokenFormerError, match="StaticCache is not supported"):
        model(x, past_key_values=StaticCache(config=model.config, max_cache_len=8))
    with pytest.raises(tf.TokenFormerError, match=r"attention_mask has shape \(1, 3\) but the model sees 0 cached "
                                                  r"and 4 new positions"):
        model(x, attention_mask=torch.ones(1, 3))


def test_nothing_in_the_package_imports_the_integration_but_the_convert_command():
    from tests.test_layout import import_graph

    graph, _ = import_graph()
    importers = {module for module, imported in graph.items() if not module.startswith("tokenformer.hf")
                 and any(m == "tokenformer.hf" or m.startswith("tokenformer.hf.") for m in imported)}
    assert importers == {"tokenformer.cli.convert"}

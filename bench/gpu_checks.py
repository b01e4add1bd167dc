"""The correctness parts of the GPU suite (`bench/gpu.py`): each compares what the device computes
with an independent computation and returns its figures and `checks` (value, limit, ok).

    logits      the model's logits on the device (fp32; bf16 weights; bf16 autocast) against the
                same weights in float64 on the CPU, for each Pattention normalisation
    gradients   one training step's gradients on the device (fp32, bf16 autocast) against float64 on the CPU
    training    short runs of the training loop in bf16 and fp16 (GradScaler): the loss falls
    resume      the loop's exact resume on the device (and whether two straight runs agree bitwise)
    fsdp        FSDP2 on one rank (torchrun) against an unsharded copy through the same steps, fp32 and bf16
    compile     `torch.compile` of the model (logits, gradients) and of the decode step (greedy tokens)
    hf_generate transformers' `generate` on the device against the native greedy generation

The float64 CPU model is the reference because tests/test_model.py holds it to a float64 formula
written from the spec (to 1e-6); what is measured here is what the device and its precision add.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.train_speed import synthetic_corpus
from tokenformer import Config, TokenFormer, generate_tokens
from tokenformer.decode import Decoder
from tokenformer.evaluation.scoring import next_token_loss
from tokenformer.models.config import NORM_ACTIVATION_TYPES
from tokenformer.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]

# Relative error ||x - reference|| / ||reference|| allowed against the float64 CPU model.
# fp32: each rounding is within 2^-24 ~ 6e-8; a product over k terms adds errors of random sign,
# ~sqrt(k) x 6e-8 ~ 2e-6 at k = 1024, and a dozen rounded stages (norms, products, residual sums)
# stay near 1e-5; 1e-4 leaves a factor of ten, and still catches TF32 (10 bits: ~1e-3) slipping in.
FP32_TOLERANCE = 1e-4
# bf16: tests/test_decode.py's derivation (8 significant bits, ~10 stages: ~0.6%; 3% for the worst).
BF16_TOLERANCE = 0.03
# A model can be more sensitive than that: with the softmax normalisation, rounding only the weights
# to bf16 (float64 arithmetic) already moves these logits by 4% at 2 layers and 15% at 6, since
# a score's absolute rounding error becomes its weight's relative error. Computing in bf16 rounds the
# activations too, about as many roundings again: measured 1.6-2.3x the weights-only error on the
# CPU (bf16 products accumulating in fp32, as on a GPU). So the bf16 limit is the larger of
# BF16_TOLERANCE and this factor x the weights-only error; 4 leaves room, and a wrong kernel's error
# is of order 1.
BF16_SENSITIVITY_FACTOR = 4
# The short training runs: the mean loss of the last quarter of the steps, over the first step's.
# ln(257) = 5.55 nats at the start; the unigram of the 64-symbol chain alone gives ln(64) = 4.16 (0.75).
LOSS_FALL_LIMIT = 0.75


def check(value: float, limit: float) -> dict:
    """One checked figure: ok when `value` is at most `limit` (a NaN is never ok)."""
    value = float(value)
    return {"value": value, "limit": limit, "ok": bool(value <= limit)}


def holds(condition: bool) -> dict:
    """One checked fact: ok when it holds."""
    return {"value": bool(condition), "limit": True, "ok": bool(condition)}


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x.detach().double().cpu() - reference).norm() / reference.norm())


def spread(model: TokenFormer) -> TokenFormer:
    """Weights with a trained model's spread: embedding 0.5 and value tokens 0.1 (the scale of
    tests/test_model.py's random checkpoints), key tokens 1/sqrt(width), so that scores have unit
    rms (the l2 normalisations do not see their scale; the softmax then has a trained attention's
    temperature, neither uniform nor one-hot). Logits spread over several units: errors are relative
    to real values, and greedy decoding meets no near ties."""
    with torch.no_grad():
        model.word_embeddings.weight.normal_(0, 0.5)
        for layer in model.pattentions().values():
            layer.key_param_tokens.normal_(0, layer.key_param_tokens.shape[1] ** -0.5)
            layer.value_param_tokens.normal_(0, 0.1)
    return model


def reference_and_device_models(suite, **fields) -> tuple[TokenFormer, TokenFormer, Config]:
    """The suite's check model in float64 on the CPU and the same weights in fp32 on the device."""
    config = Config.from_name(**{**suite.shapes["check_model"], **fields})
    torch.manual_seed(0)
    reference = spread(TokenFormer(config, dtype=torch.float64)).eval()
    model = TokenFormer(config, device=suite.run.device)
    model.load_state_dict(reference.state_dict())  # cast to float32 on the device
    return reference, model.eval(), config


def random_ids(suite, config: Config, length: int | None = None) -> torch.Tensor:
    """(B, T) token ids on the CPU, from a seed of their own."""
    generator = torch.Generator().manual_seed(1)
    shape = (suite.shapes["check_batch"], length or suite.shapes["check_seq"])
    return torch.randint(0, config.vocab_size, shape, generator=generator)


# ---- logits and gradients -----------------------------------------------------------------------

def bf16_rounding_error(reference: TokenFormer, idx: torch.Tensor, expected: torch.Tensor) -> float:
    """How far the float64 model moves when only its weights are rounded to bf16: its sensitivity."""
    rounded = TokenFormer(reference.config, dtype=torch.float64).eval()
    rounded.load_state_dict({k: v.to(torch.bfloat16).double() for k, v in reference.state_dict().items()})
    return relative_error(rounded(idx), expected)


def logits(suite) -> dict:
    """Relative error of the device's logits against float64 on the CPU, per normalisation."""
    out, checks = {}, {}
    for variant in NORM_ACTIVATION_TYPES:
        reference, model, config = reference_and_device_models(suite, norm_activation_type=variant)
        idx = random_ids(suite, config)
        with torch.no_grad():
            expected = reference(idx)
            sensitivity = bf16_rounding_error(reference, idx, expected)
            device_idx = idx.to(suite.run.device)
            errors = {"fp32": relative_error(model(device_idx), expected)}
            with torch.autocast(suite.run.device.type, dtype=torch.bfloat16):
                errors["bf16_autocast"] = relative_error(model(device_idx), expected)
            errors["bf16_weights"] = relative_error(model.to(torch.bfloat16)(device_idx), expected)
        bf16_limit = max(BF16_TOLERANCE, BF16_SENSITIVITY_FACTOR * sensitivity)
        out[variant] = {**errors, "bf16_weights_rounded_float64": sensitivity, "bf16_limit": bf16_limit}
        checks[f"{variant}_fp32"] = check(errors["fp32"], FP32_TOLERANCE)
        checks[f"{variant}_bf16_autocast"] = check(errors["bf16_autocast"], bf16_limit)
        checks[f"{variant}_bf16_weights"] = check(errors["bf16_weights"], bf16_limit)
        suite.log(f"  {variant}: relative error fp32 {errors['fp32']:.2e}, bf16 autocast "
                  f"{errors['bf16_autocast']:.2e}, bf16 weights {errors['bf16_weights']:.2e} (limit {bf16_limit:.2e}; "
                  f"bf16-rounded weights alone, float64: {sensitivity:.2e})")
    return {"relative_error": out, "shape": suite.shapes["check_model"], "checks": checks}


def gradients_of(model, idx: torch.Tensor, targets: torch.Tensor, precision: str | None = None,
                 forward=None):
    """The loss and the gradients (by name) of one training step's backward through `forward`
    (default `model`; a compiled wrapper of it, say), under bf16 autocast when `precision` is bf16."""
    model.zero_grad(set_to_none=True)
    forward = model if forward is None else forward
    if precision:
        with torch.autocast(idx.device.type, dtype=torch.bfloat16):
            out = forward(idx)
    else:
        out = forward(idx)
    loss = next_token_loss(out, targets)
    loss.backward()
    return float(loss.detach()), {name: p.grad.detach().double().cpu() for name, p in model.named_parameters()}


def gradients(suite) -> dict:
    """Relative error of one step's gradients on the device against float64 on the CPU: of the
    whole gradient (all parameters as one vector) and the worst single parameter."""
    reference, model, config = reference_and_device_models(suite)
    model.train()
    batch = random_ids(suite, config, suite.shapes["check_seq"] + 1)
    loss64, expected = gradients_of(reference.train(), batch[:, :-1], batch[:, 1:])
    device_batch = batch.to(suite.run.device)
    out, checks = {"loss_float64": loss64}, {}
    for name, precision in (("fp32", None), ("bf16_autocast", "bf16")):
        loss, grads = gradients_of(model, device_batch[:, :-1], device_batch[:, 1:], precision)
        squared = sum(float((grads[n] - expected[n]).norm() ** 2) for n in expected)
        whole = math.sqrt(squared) / math.sqrt(sum(float(g.norm() ** 2) for g in expected.values()))
        per_parameter = {n: relative_error(grads[n], expected[n]) for n in expected}
        worst = max(per_parameter, key=per_parameter.get)
        out[name] = {"loss": loss, "relative_error": whole, "worst_parameter": worst,
                     "worst_parameter_relative_error": per_parameter[worst]}
        checks[name] = check(whole, FP32_TOLERANCE if name == "fp32" else BF16_TOLERANCE)
        suite.log(f"  {name}: loss {loss:.6f} (float64 {loss64:.6f}), gradient relative error {whole:.2e} "
                  f"(worst {worst}: {per_parameter[worst]:.2e})")
    return {**out, "checks": checks}


# ---- the training loop --------------------------------------------------------------------------

def corpus(suite) -> Path:
    """The learnable corpus of `bench.train_speed`, written once per suite run."""
    directory = suite.workdir / "corpus"
    if not directory.exists():
        directory.mkdir()
        synthetic_corpus(directory, suite.shapes["loop"]["corpus_tokens"], learnable=True)
    return directory


def loop_config(suite, **changes) -> TrainConfig:
    loop = suite.shapes["loop"]
    values = dict(model={"name": loop["preset"], "seq_length": loop["seq"]}, data_path=str(corpus(suite)),
                  train_iters=loop["steps"], train_micro_batch_size_per_gpu=loop["micro_batch"], eval_iters=0,
                  lr=loop["lr"], min_lr=loop["lr"] / 10, warmup_iters=max(1, loop["steps"] // 10), log_interval=loop["steps"],
                  save_interval=loop["steps"], progress=False, plot=False, device=str(suite.run.device),
                  precision="bf16", seed=5)
    return TrainConfig(**{**values, **changes})


@contextmanager
def fp16_on_cpu(device: torch.device):
    """The loop refuses fp16 off a GPU (its loss scaling is a GPU feature). The CPU dry run lets it
    through with torch's CPU GradScaler, so that the part runs end to end; on a GPU, nothing changes."""
    if device.type == "cuda":
        yield
        return
    from tokenformer.training import loop

    saved = loop.check_precision, loop.grad_scaler
    loop.check_precision = lambda precision, device: None
    loop.grad_scaler = lambda precision: torch.amp.GradScaler("cpu") if precision == "fp16" else None
    try:
        yield
    finally:
        loop.check_precision, loop.grad_scaler = saved


def training(suite) -> dict:
    """`tokenformer.training.loop.train` in bf16 and in fp16 on the learnable corpus: every loss
    finite, and the last quarter's mean loss below LOSS_FALL_LIMIT x the first step's."""
    from tokenformer.training.loop import train

    out, checks = {}, {}
    for precision in ("bf16", "fp16"):
        with fp16_on_cpu(suite.run.device):
            summary = train(loop_config(suite, precision=precision))
        losses = [summary["losses"][step] for step in sorted(summary["losses"])]
        tail = losses[-max(1, len(losses) // 4):]
        ratio = statistics.mean(tail) / losses[0] if all(map(math.isfinite, losses)) else math.inf
        out[precision] = {"first_loss": losses[0], "last_quarter_mean_loss": statistics.mean(tail),
                          "loss_ratio": ratio, "tokens_per_s": summary["tokens_per_s"], "losses": losses}
        checks[f"{precision}_loss_falls"] = check(ratio, LOSS_FALL_LIMIT)
        suite.log(f"  {precision}: loss {losses[0]:.3f} -> {statistics.mean(tail):.3f} over {len(losses)} steps")
    return {**out, "shape": suite.shapes["loop"], "checks": checks}


def final_weights(summary: dict) -> dict[str, torch.Tensor]:
    return load_file(str(Path(summary["checkpoint"]) / "model.safetensors"))


def largest_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two dicts of the same keys (losses or tensors)."""
    if a.keys() != b.keys():
        return math.inf
    return max(float((torch.as_tensor(a[k]).double() - torch.as_tensor(b[k]).double()).abs().max()) for k in a)


def resume(suite) -> dict:
    """The loop's exact resume on the device (bf16 autocast): a run stopped at half its schedule and
    resumed gives the losses and final weights of the straight run bit for bit. A second straight
    run says whether the device's kernels are run-to-run deterministic at all."""
    from tokenformer.training.loop import train

    steps = suite.shapes["loop"]["resume_steps"]

    def run(name: str, **changes):
        values = dict(save=str(suite.workdir / name), train_iters=steps, lr_decay_iters=steps,
                      save_interval=steps // 2, log_interval=1)
        return train(loop_config(suite, **{**values, **changes}))
    straight, again = run("straight"), run("again")
    first = run("stopped", train_iters=steps // 2)
    resumed = run("stopped", resume=True)
    differences = {"resumed_losses": largest_difference({**first["losses"], **resumed["losses"]}, straight["losses"]),
                   "resumed_weights": largest_difference(final_weights(resumed), final_weights(straight)),
                   "repeat_losses": largest_difference(again["losses"], straight["losses"]),
                   "repeat_weights": largest_difference(final_weights(again), final_weights(straight))}
    suite.log("  largest differences: " + ", ".join(f"{k} {v:.3g}" for k, v in differences.items()))
    return {"steps": steps, "resumed_from": resumed["resumed_from"], "largest_difference": differences,
            "checks": {"resumed_losses_exact": check(differences["resumed_losses"], 0.0),
                       "resumed_weights_exact": check(differences["resumed_weights"], 0.0)}}


# ---- FSDP2, compile, transformers ---------------------------------------------------------------

def fsdp_run(suite, dtype: str) -> dict:
    """`bench.fsdp_step --reference` under `torchrun --nproc_per_node 1`: its JSON."""
    f = suite.shapes["fsdp"]
    with tempfile.TemporaryDirectory(dir=suite.workdir) as tmp:
        out = Path(tmp) / "fsdp_step.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   "-m", "bench.fsdp_step", "--out", str(out), "--device", suite.run.device.type, "--dtype", dtype,
                   "--preset", f["preset"], "--seq", str(f["seq"]), "--micro-batch", str(f["micro_batch"]),
                   "--steps", str(f["steps"]), "--warmup", "1", "--variants", "eager", "--reference",
                   "--peak-matmul", "64"]
        if not suite.run.cuda:  # the dry run: the rank gets this process's threads, not torchrun's one
            command += ["--threads", str(torch.get_num_threads())]
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=suite.seconds_left())
        suite.log(done.stdout + done.stderr, echo=False)
        if done.returncode != 0:
            raise RuntimeError(f"bench.fsdp_step under torchrun failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def fsdp(suite) -> dict:
    """FSDP2 on one rank: sharded (DTensor parameters) and the losses of an unsharded copy through
    the same steps, to float32 rounding in fp32 and within the bf16 tolerance in bf16."""
    out, checks = {}, {}
    for dtype, limit in (("fp32", FP32_TOLERANCE), ("bf16", BF16_TOLERANCE)):
        result = fsdp_run(suite, dtype)
        eager = result["variants"]["eager"]
        out[dtype] = result
        checks[f"{dtype}_sharded"] = holds(eager["sharded"])
        checks[f"{dtype}_losses_match_unsharded"] = check(eager["loss_relative_difference"], limit)
        suite.log(f"  {dtype}: losses {eager['losses'][0]:.4f} -> {eager['losses'][-1]:.4f}, "
                  f"largest relative difference to the unsharded copy {eager['loss_relative_difference']:.2e}")
    return {**out, "checks": checks}


def compile_check(suite) -> dict:
    """`torch.compile` of the whole model against eager (logits and gradients, fp32), and the
    compiled decode step (`Decoder(compile=True)`: CUDA graphs on a GPU) against the plain greedy tokens."""
    _, model, config = reference_and_device_models(suite, num_layers=2)
    batch = random_ids(suite, config, suite.shapes["check_seq"] + 1).to(suite.run.device)
    eager_loss, eager = gradients_of(model.train(), batch[:, :-1], batch[:, 1:])
    compiled_loss, compiled = gradients_of(model, batch[:, :-1], batch[:, 1:], forward=torch.compile(model))
    whole = math.sqrt(sum(float((compiled[n] - eager[n]).norm() ** 2) for n in eager)) / \
        math.sqrt(sum(float(g.norm() ** 2) for g in eager.values()))
    model.eval()
    prompt, new = random_ids(suite, config, 16)[0].tolist(), suite.shapes["decode_new_tokens"]
    tokens = {"plain": list(generate_tokens(model, prompt, new)),
              "static": list(generate_tokens(Decoder(model), prompt, new)),
              "compiled": list(generate_tokens(Decoder(model, compile=True), prompt, new))}
    mismatches = {name: sum(a != b for a, b in zip(t, tokens["plain"])) for name, t in tokens.items()}
    suite.log(f"  compiled model: loss {compiled_loss:.6f} vs eager {eager_loss:.6f}, gradient relative "
              f"difference {whole:.2e}; decode tokens differing from plain: {mismatches}")
    return {"loss_relative_difference": abs(compiled_loss - eager_loss) / abs(eager_loss),
            "gradient_relative_difference": whole, "decode_tokens": tokens, "decode_mismatches": mismatches,
            "checks": {"model_loss": check(abs(compiled_loss - eager_loss) / abs(eager_loss), FP32_TOLERANCE),
                       "model_gradients": check(whole, FP32_TOLERANCE),
                       "decode_step_tokens": check(mismatches["compiled"] + mismatches["static"], 0)}}


def hf_generate(suite) -> dict:
    """`TokenFormerForCausalLM.generate` (greedy) on the device against `generate_tokens` on the
    same tensors: the same tokens in fp32 (bf16 recorded, not checked: near ties may round apart)."""
    from tokenformer.hf import to_hf

    _, model, config = reference_and_device_models(suite)
    prompt, new = random_ids(suite, config, 24)[:1], suite.shapes["decode_new_tokens"]
    out = {}
    for dtype in ("fp32", "bf16"):
        native = model if dtype == "fp32" else model.to(torch.bfloat16)
        hf = to_hf(native, eos_token_id=config.vocab_size - 1).eval()
        hf.generation_config.eos_token_id = None  # as the native run: no end-of-text stop
        ids = prompt.to(suite.run.device)
        with torch.no_grad():
            generated = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
        hf_tokens = generated[0, ids.shape[1]:].tolist()
        native_tokens = list(generate_tokens(native, prompt[0].tolist(), new, vocab_size=config.vocab_size))
        out[dtype] = {"hf": hf_tokens, "native": native_tokens,
                      "mismatches": sum(a != b for a, b in zip(hf_tokens, native_tokens)) +
                      abs(len(hf_tokens) - len(native_tokens))}
    suite.log(f"  tokens differing, fp32: {out['fp32']['mismatches']} of {new}; bf16: {out['bf16']['mismatches']}")
    return {**out, "checks": {"fp32_tokens_equal": check(out["fp32"]["mismatches"], 0)}}

"""The language model's construction and activation checkpointing against what they must do: a
model built in bfloat16 holds bfloat16 everywhere; checkpointing recomputes each block in the
backward with the same gradients, and calls a checkpoint function transformers set with the
block and its inputs."""

import torch

import tokenformer as tf


def test_a_model_built_in_bfloat16_is_bfloat16_throughout():
    model = tf.TokenFormer(tf.Config.from_name("tiny"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_activation_checkpointing_recomputes_each_block_and_uses_a_set_checkpoint_function():
    model = tf.TokenFormer(tf.Config.from_name("tiny")).train()
    x = torch.randint(0, 257, (2, 9))
    calls = []
    model.layers[0].register_forward_pre_hook(lambda module, args: calls.append(module))  # at each call
    reference = model(x)
    reference.square().mean().backward()
    plain_grad = model.layers[0].mlp.key_param_tokens.grad.clone()
    assert len(calls) == 1
    model.zero_grad()
    model.gradient_checkpointing = True
    model(x).square().mean().backward()
    assert len(calls) == 3  # the forward, then once more in the backward
    torch.testing.assert_close(model.layers[0].mlp.key_param_tokens.grad, plain_grad)
    seen = []

    def recording(function, *args):
        seen.append(getattr(function, "__self__", None))
        return function(*args)

    model._gradient_checkpointing_func = recording
    torch.testing.assert_close(model(x), reference)
    assert seen == list(model.layers)

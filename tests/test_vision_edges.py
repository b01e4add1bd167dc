"""The vision model built in a dtype and on a device holds every parameter there, and activation
checkpointing gives the outputs and gradients of the plain forward."""

import torch

import tokenformer as tf


def test_every_parameter_follows_the_dtype_and_device_asked_for():
    config = tf.VisionConfig.from_name("tiny-28")
    assert {p.dtype for p in tf.VisionTokenFormer(config, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}
    assert {p.device.type for p in tf.VisionTokenFormer(config, device="meta").parameters()} == {"meta"}


def test_activation_checkpointing_gives_the_plain_outputs_and_gradients():
    model = tf.VisionTokenFormer(tf.VisionConfig.from_name("tiny-28")).train()
    images = torch.randn(2, 1, 28, 28)
    plain = model(images)
    plain.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    torch.testing.assert_close(model(images), plain)
    model(images).square().mean().backward()
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)

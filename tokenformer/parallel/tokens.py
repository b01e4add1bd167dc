"""Token parallelism: every Pattention's key and value parameter tokens split over the `tp` ranks.

A Pattention `y = theta(x @ K.T) @ V` is a sum over its n parameter tokens once the normalisation
is known, and the normalisation needs only one number per row from the whole token axis:

    rank r holds K_r, V_r (n/P tokens each, `Shard(0)`), and x whole (`Replicate`)
    s_r = x @ K_r.T                                   local scores       (..., n/P)
    l2_norm_gelu:  ||s||^2 = sum_r ||s_r||^2           one all-reduce     (..., 1)
    gelu_l2_norm:  ||gelu(s)||^2 = sum_r ...           one all-reduce     (..., 1)
    softmax:       max_r max(s_r), sum_r sum exp(..)   two all-reduces    (..., 1)
    y = sum_r theta(s)_r @ V_r                         one all-reduce (or reduce-scatter)  (..., d_out)

The scale is `sqrt(n)` (or `n`) of the global n or the pinned `scale_num`: the DTensor parameter's
shape is the global one, so `Pattention.effective_scale_num` needs no change. The arithmetic runs
on DTensors (`torch.distributed.tensor`), whose sharding propagation places exactly these
collectives and differentiates through them: the norm's all-reduce has an all-reduce in its
backward (every rank's share adds to the shared norm), the replicated input's gradient is
all-reduced, the output's reduction has none.

The attention between q/k/v and proj runs on heads: q, k and v reduce-scatter their partial sums
over the hidden dim (head-major, so each rank receives whole heads), attention runs on the local
H/P heads, and proj all-gathers its input. Reduce-scatter + all-gather move what one all-reduce
moves, so the three q/k/v outputs cost 1.5 all-reduces instead of 3, and the attention itself is
split P ways instead of repeated on every rank.

The embedding and the tied head are vocabulary-parallel (`Shard(0)` of the embedding matrix):
the lookup masks the ids outside a rank's rows and all-reduces, the head gives logits sharded over
the vocabulary, and the loss runs on them inside `loss_context` (torch's `loss_parallel`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import loss_parallel

from tokenformer.errors import TokenFormerError
from tokenformer.models.pattention import Pattention

# The plan is applied by the functions below (hooks and `distribute_tensor`), not by torch's
# ParallelStyles, whose Colwise/Rowwise styles fit nn.Linear and nn.Embedding, not a Pattention.


def token_parallel(module: Pattention, mesh: DeviceMesh, input_layout: Placement = Replicate(),
                   output_layout: Placement = Replicate()) -> None:
    """Shard a Pattention's key and value tokens `Shard(0)` over `mesh`, in place.

    `input_layout` says how the incoming (local) tensor is laid out: `Replicate()` (the whole
    hidden state) or `Shard(-1)` (this rank's heads, gathered before the scores). `output_layout`
    says how the summed outputs leave: `Replicate()` (all-reduce) or `Shard(-1)` (reduce-scatter:
    this rank's slice of the output dim). The module's own forward runs unchanged, on DTensors.
    """
    if not isinstance(module, Pattention):
        raise TypeError(f"token_parallel shards a Pattention, not a {type(module).__name__}")
    shard_tokens(module, mesh)

    def prepare_input(_module, args):
        x = args[0] if isinstance(args[0], DTensor) else DTensor.from_local(args[0], mesh, [input_layout])
        if x.placements[0] != Replicate():
            # all-gather the heads. Only then: even a no-op redistribute all-reduces the gradient in
            # the backward, where a shared replicated input should sum its users' gradients first
            x = x.redistribute(mesh, [Replicate()])
        return (x, *args[1:])

    def prepare_output(_module, _args, y):
        return y.redistribute(mesh, [output_layout]).to_local()  # all-reduce or reduce-scatter

    module.register_forward_pre_hook(prepare_input)
    module.register_forward_hook(prepare_output)


def shard_tokens(module: Pattention, mesh: DeviceMesh) -> None:
    """Replace the module's key and value tokens by DTensors `Shard(0)` over `mesh` (n/P each)."""
    size = mesh.size()
    if module.num_tokens % size:
        raise TokenFormerError(f"a Pattention of {module.num_tokens} parameter tokens does not split evenly over "
                               f"tp_size {size}: use a tp_size that divides every slot number")
    _distribute(module, mesh, Shard(0))


def _distribute(module: nn.Module, mesh: DeviceMesh, placement: Placement) -> None:
    for name, param in list(module.named_parameters(recurse=False)):
        sharded = distribute_tensor(param.detach(), mesh, [placement])
        module.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))


def replicated_input(module: nn.Module, mesh: DeviceMesh) -> None:
    """Parameters `Replicate()` and the input made a replicated DTensor, output left as it is: the
    final LayerNorm (whose output meets the vocabulary-sharded head matrix), and the attention (whose
    q, k and v then share one input, so their gradients are summed before one all-reduce)."""
    _distribute(module, mesh, Replicate())

    def prepare_input(_module, args):
        x = args[0]
        return (x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, [Replicate()]), *args[1:])

    module.register_forward_pre_hook(prepare_input)


def vocabulary_parallel(embedding: nn.Embedding, mesh: DeviceMesh) -> None:
    """The embedding matrix `Shard(0)` over the vocabulary: a rank looks up the ids of its rows (the
    others give zeros) and the lookups are all-reduced; the tied head reads the same shards."""
    _distribute(embedding, mesh, Shard(0))

    def prepare_input(_module, args):
        return (DTensor.from_local(args[0], mesh, [Replicate()]), *args[1:])

    def prepare_output(_module, _args, y):
        return y.redistribute(mesh, [Replicate()]).to_local()

    embedding.register_forward_pre_hook(prepare_input)
    embedding.register_forward_hook(prepare_output)


def check_token_parallel(config, tp_size: int) -> None:
    """Refuse, in one sentence, a model whose heads, slots or vocabulary do not split over `tp_size`."""
    counts = {"num_attention_heads": config.num_attention_heads, "qkv_slot_num": config.qkv_slot_num,
              "proj_slot_num": config.proj_slot_num, "ffn_slot_num": config.ffn_slot_num,
              "padded_vocab_size": config.padded_vocab_size}
    uneven = [f"{name} {value}" for name, value in counts.items() if value % tp_size]
    if uneven:
        raise TokenFormerError(f"tp_size {tp_size} does not divide {', '.join(uneven)}: token parallelism splits "
                               f"heads, parameter tokens and the vocabulary evenly; pick a tp_size that divides them")


def plan(model: nn.Module) -> dict[str, Callable[[nn.Module, DeviceMesh], None]]:
    """The token-parallel plan of a language model (`TokenFormer`, or a pipeline stage of one):
    module name -> what shards it."""
    styles: dict[str, Callable[[nn.Module, DeviceMesh], None]] = {}
    if hasattr(model, "word_embeddings"):  # a pipeline stage may hold neither (or only the head's copy)
        styles["word_embeddings"] = vocabulary_parallel
    if hasattr(model, "final_norm"):
        styles["final_norm"] = replicated_input
    heads, gathered = (lambda m, mesh: token_parallel(m, mesh, Replicate(), Shard(-1)),
                       lambda m, mesh: token_parallel(m, mesh, Shard(-1), Replicate()))
    for i, _ in model.layers.named_children():  # a ModuleList, or a pipeline stage's dict of its blocks
        prefix = f"layers.{i}"
        # q, k and v read one replicated DTensor: their three input gradients meet in one all-reduce
        styles[f"{prefix}.attention"] = replicated_input
        for name in ("query", "key", "value"):  # reduce-scatter: this rank's heads
            styles[f"{prefix}.attention.{name}"] = heads
        styles[f"{prefix}.attention.proj"] = gathered
        styles[f"{prefix}.mlp"] = token_parallel
    return styles


def parallelize_tokens(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard a language model over the 1-D `tp` mesh in place (see the module docstring)."""
    check_token_parallel(model.config, mesh.size())
    for name, apply in plan(model).items():
        apply(model.get_submodule(name), mesh)
    return model


@contextlib.contextmanager
def loss_context(enabled: bool) -> Iterator[None]:
    """`loss_parallel` (the cross-entropy on vocabulary-sharded logits, forward and backward) when
    `enabled`, else nothing."""
    if not enabled:
        yield
        return

    with loss_parallel():
        yield


"""Pipeline parallelism of the language model on `torch.distributed.pipelining`.

A stage holds consecutive blocks; the first also embeds the token ids, the last applies the final
norm and the head. The head is the embedding matrix (tied): the first and the last stage each
hold a copy, and `sync_tied_gradients` sums their two gradients, so that both copies take the
step one process takes with its one matrix. A step's micro-batches are the gradient-accumulation
micro-batches of the one-process run: the schedule (GPipe or 1F1B) splits the step's batch into
them and averages their gradients, as accumulation does.

Parameter names are the full model's (`layers.5.mlp...` on the stage that holds block 5), so a
stage's state dict is a slice of the model's and DCP checkpoints reload on any other layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.tensor import DTensor

from tokenformer.errors import TokenFormerError
from tokenformer.evaluation.scoring import next_token_loss
from tokenformer.models.lm import rotary_cos_sin

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
TIED = "word_embeddings.weight"


def stage_layers(num_layers: int, num_stages: int) -> list[range]:
    """The blocks of each stage: consecutive, as even as the count allows (earlier stages take the
    extra block, the last stage also carries the head)."""
    if num_layers < num_stages:
        raise TokenFormerError(f"{num_layers} layers do not fill {num_stages} pipeline stages: use pp_size <= "
                               f"{num_layers}")
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for stage in range(num_stages):
        bounds.append(bounds[-1] + base + (stage < extra))
    return [range(bounds[s], bounds[s + 1]) for s in range(num_stages)]


class LanguageModelStage(nn.Module):
    """Stage `stage` of `num_stages` of a `TokenFormer`, made of that model's own modules."""

    def __init__(self, model: nn.Module, stage: int, num_stages: int) -> None:
        super().__init__()
        self.config = model.config
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        self.num_stages = num_stages
        if self.is_first or self.is_last:
            self.word_embeddings = model.word_embeddings
        # keyed by the model's block index: parameter names stay those of the whole model
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in stage_layers(len(model.layers), num_stages)[stage]})
        if self.is_last:
            self.final_norm = model.final_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) on the first stage, hidden states (B, T, h) after; logits (B, T, V) from the last."""
        if self.is_first:
            x = self.word_embeddings(x)  # (B, T, h)
        positions = torch.arange(x.shape[1], device=x.device)
        cos, sin = rotary_cos_sin(positions, self.config.rotary_dim, self.config.rotary_emb_base, x.dtype)
        for block in self.layers.values():
            x = block(x, cos, sin)
        if self.is_last:
            x = self.final_norm(x) @ self.word_embeddings.weight.T  # (B, T, V)
        return x


class Pipeline:
    """This rank's stage and its schedules, over the ranks of `group` (one per stage, in order).

    Built in two steps: the stage first (`stage`, a slice of the model that token parallelism and
    FSDP2 then shard in place), the schedules after (`start`)."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup, schedule: str = "1f1b") -> None:
        if schedule not in SCHEDULES:
            raise TokenFormerError(f"unknown pipeline schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
        self.group, self.schedule_name = group, schedule
        self.num_stages, self.index = dist.get_world_size(group), dist.get_rank(group)
        if self.num_stages == 1:
            raise TokenFormerError("a pipeline of one stage is the plain model: use pp_size 1")
        self.stage = LanguageModelStage(model, self.index, self.num_stages)
        self.stage.pipeline_group = group  # `stage_states` gathers the whole model over it
        self.schedule = self.eval_schedule = None

    def start(self, micro_batches: int, device: torch.device | str = "cpu") -> "Pipeline":
        """The training schedule over `micro_batches` per step, and a one-micro-batch one for evaluation."""
        if self.schedule_name == "1f1b" and micro_batches < self.num_stages:
            raise TokenFormerError(f"1F1B needs at least as many micro-batches as stages ({self.num_stages}): raise "
                                   f"gradient_accumulation_steps or use pp_schedule gpipe")
        device = torch.device(device)
        self.schedule = SCHEDULES[self.schedule_name](
            PipelineStage(self.stage, self.index, self.num_stages, device, group=self.group),
            n_microbatches=micro_batches, loss_fn=next_token_loss)
        self.eval_schedule = ScheduleGPipe(PipelineStage(self.stage, self.index, self.num_stages, device,
                                                         group=self.group), n_microbatches=1)
        return self

    @torch.no_grad()
    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of token ids (B, T) on every stage: the last computes them, then sends them
        to the others (evaluation only; a training step never moves logits)."""
        if self.stage.is_first:
            self.eval_schedule.eval(idx)
        out = self.eval_schedule.eval() if self.stage.is_last else None
        if isinstance(out, DTensor):  # token-parallel head: vocabulary-sharded logits
            out = out.full_tensor()
        logits = out.contiguous() if self.stage.is_last else \
            torch.empty(*idx.shape, self.stage.config.padded_vocab_size, device=idx.device)
        dist.broadcast(logits, group=self.group, group_src=self.num_stages - 1)
        return logits

    def step(self, batch: torch.Tensor) -> float:
        """Forward and backward of a step's (B, T + 1) windows, split into the micro-batches; the
        tied gradients summed. Returns the mean micro-batch loss (on every stage)."""
        inputs, targets, losses = batch[:, :-1], batch[:, 1:], []
        if self.stage.is_first:
            self.schedule.step(inputs)
        elif self.stage.is_last:
            self.schedule.step(target=targets, losses=losses)
        else:
            self.schedule.step()
        sync_tied_gradients(self.stage, self.group)
        loss = torch.stack(losses).mean().detach() if self.stage.is_last else torch.zeros(())
        dist.all_reduce(loss, group=self.group)  # only the last stage's is not zero
        return float(loss)

    def clip_gradients(self, max_norm: float) -> float:
        """Clip the gradient norm of the whole model (every stage; the tied matrix counted once) to
        `max_norm` (0: measure only); returns the norm before clipping."""
        counted = [p.grad for name, p in self.stage.named_parameters()
                   if p.grad is not None and not (name == TIED and self.stage.is_last)]
        local = torch.nn.utils.get_total_norm(counted) if counted else torch.zeros(())
        if isinstance(local, DTensor):  # sharded by FSDP2 or token parallelism
            local = local.full_tensor()
        squared = local.float() ** 2
        dist.all_reduce(squared, group=self.group)
        total = squared.sqrt()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_([p for p in self.stage.parameters() if p.grad is not None],
                                                 max_norm, total)
        return float(total)


class PipelineModel(nn.Module):
    """The pipelined model seen whole for evaluation: `model(idx)` gives the logits on every stage
    (`Pipeline.logits`); its parameters are this rank's stage's."""

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.stage = pipeline.stage

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.pipeline.logits(idx)


def sync_tied_gradients(stage: LanguageModelStage, group: dist.ProcessGroup) -> None:
    """Sum the embedding matrix's gradient of the first and the last stage (the head's share and the
    lookup's share), so both copies step alike. Two stages: `group` is exactly those two."""
    if stage.num_stages > 2:
        raise TokenFormerError("more than 2 pipeline stages need a group of the first and last stage only; "
                               "this version pipelines over 2 stages")
    if stage.is_first or stage.is_last:
        weight = stage.word_embeddings.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        elif isinstance(weight.grad, DTensor) and weight.grad.placements != weight.placements:
            # the vocabulary-parallel lookup's gradient comes back Replicate (the whole matrix on every tp
            # rank), the head's Shard(0): keep this rank's rows (a local slice, no communication)
            weight.grad = weight.grad.redistribute(weight.device_mesh, weight.placements)
        # both copies are now sharded alike (the same data-parallel and tp positions): sum shard with shard
        dist.all_reduce(weight.grad.to_local() if isinstance(weight.grad, DTensor) else weight.grad, group=group)


def stage_states(state: dict[str, torch.Tensor], group: dist.ProcessGroup) -> dict[str, torch.Tensor]:
    """The whole model's state from every stage's `state` (collective over the pipeline group)."""
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, state, group=group)
    return {name: tensor for part in parts for name, tensor in part.items()}

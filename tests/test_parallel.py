"""Token and pipeline parallelism (`tokenformer.parallel`) on CPU with gloo, against one process.

Model level (two processes from torch.multiprocessing, one launch for everything; each rank
computes its one-process reference itself):
  - token parallelism, every norm variant: logits, loss and every parameter's gradient; exact
    growth keeps the logits; official growth gives the logits of the same growth in one process
    (the same new rows, in another token order);
  - a two-stage pipeline, GPipe and 1F1B: per-step losses, gradient norms and the weights after
    three AdamW steps of four accumulated micro-batches.

Training level (torchrun, `tokenformer train --tp_size 2` / `--pp_size 2`): per-step losses and
gradient norms equal one process's with the same global batch; checkpoints are DCP shards that
reload on another layout (TP=2 -> one process, TP=2 -> PP=2) with the same losses, and that
`convert` consolidates into the weights the checkpoint's model.safetensors holds; TP=2 x FSDP2=2,
PP=2 x FSDP2=2 and TP=2 x PP=2 on 4 ranks give the same losses.
"""

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.test_distributed import assert_same_losses, losses_of, run_fields, torchrun
from tokenformer import TokenFormer
from tokenformer.inputs import read_safetensors
from tokenformer.models.config import resolve_model_config
from tokenformer.parallel.pipeline import stage_layers
from tokenformer.training.config import TrainConfig
from tokenformer.training.distributed import consolidate_sharded
from tokenformer.training.loop import train
from tokenformer.training.metrics import read_metrics

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

NORMS = ("l2_norm_gelu", "softmax", "gelu_l2_norm")
# float32 sums split over two ranks: logits and losses agree to ~1e-6 (measured); gradients differ by
# at most ~1e-6 of the model's largest gradient (the softmax keys' gradients are ~1e-7 at init, so
# their own relative error is float noise)
ATOL, GRAD_RTOL = 1e-5, 1e-5
SCHEDULES = ("gpipe", "1f1b")
PIPELINE_STEPS, MICRO, ACCUMULATION = 3, 2, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_level_rank(rank: int, port: int, out: str) -> None:
    """One of two ranks: the token-parallel model (every norm variant) and the two-stage pipeline
    (both schedules), each against the one-process model it is built from."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    results = {norm: token_parallel_results(mesh, norm) for norm in NORMS}
    results["generation"] = token_parallel_generation(mesh)
    results.update({schedule: pipeline_results(schedule) for schedule in SCHEDULES})
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def token_parallel_results(mesh, norm: str) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor

    from tokenformer.evaluation.scoring import window_loss
    from tokenformer.parallel.cost import CollectiveBytes, tp_bytes_per_token
    from tokenformer.parallel.tokens import loss_context, parallelize_tokens
    from tokenformer.scaling.grow import grow

    config = resolve_model_config({"name": "tiny", "seq_length": 16, "norm_activation_type": norm})
    torch.manual_seed(0)
    reference = TokenFormer(config)
    batch = torch.randint(0, config.vocab_size, (3, 17))
    reference_loss, _ = window_loss(reference, batch)
    reference_loss.backward()
    model = parallelize_tokens(TokenFormer(config), mesh)
    # every rank reads the whole state and keeps its shards (as a resume of a full checkpoint does)
    set_model_state_dict(model, reference.state_dict(), options=StateDictOptions(full_state_dict=True))
    with loss_context(True), CollectiveBytes() as counted:
        loss, _ = window_loss(model, batch)
        loss.backward()
    with loss_context(True):
        logits = model(batch[:, :-1]).full_tensor()
    grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
             for name, p in model.named_parameters()}
    result = {
        "local_tokens": model.layers[0].mlp.key_param_tokens.to_local().shape[0],
        "logits": (logits - reference(batch[:, :-1])).abs().max().item(),
        "loss": abs(loss.item() - reference_loss.item()),
        "grads": {name: (grads[name] - p.grad).abs().max().item() for name, p in reference.named_parameters()},
        "largest_grad": max(p.grad.abs().max().item() for p in reference.parameters()),
        "sent_bytes": counted.total, "predicted_bytes": tp_bytes_per_token(config, 2, 4) * batch[:, :-1].numel()}
    with torch.no_grad(), loss_context(True):
        before = model(batch[:, :-1]).full_tensor()
        if norm != "softmax":  # exact growth is defined for the l2 variants only
            exact = grow(model, factor=2.0, mode="exact", seed=1)
            result["exact_growth"] = (exact(batch[:, :-1]).full_tensor() - before).abs().max().item()
            result["grown_local_tokens"] = exact.layers[0].mlp.key_param_tokens.to_local().shape[0]
        official = grow(model, factor=2.0, mode="official", seed=1)(batch[:, :-1]).full_tensor()
        one_process = grow(reference, factor=2.0, mode="official", seed=1)(batch[:, :-1])
        result["official_growth"] = (official - one_process).abs().max().item()
        result["official_changed"] = (official - before).abs().max().item()
    return result


def token_parallel_generation(mesh) -> dict:
    """Greedy tokens of the token-parallel model (its KV cache holding this rank's heads) and of the
    one-process model, from the same prompt."""
    from tokenformer.generate import generate_tokens
    from tokenformer.parallel.tokens import parallelize_tokens

    config = resolve_model_config({"name": "tiny", "seq_length": 32})
    torch.manual_seed(0)
    reference = TokenFormer(config).eval()
    torch.manual_seed(0)
    model = parallelize_tokens(TokenFormer(config), mesh).eval()
    prompt = [5, 17, 42, 99, 3]
    with torch.no_grad():
        cache = model.allocate_cache(1, 8)
        return {"tokens": list(generate_tokens(model, prompt, 12)), "expected": list(generate_tokens(reference, prompt,
                                                                                                      12)),
                "cached_heads": cache.keys[0].shape[1], "heads": config.num_attention_heads}


def one_process_steps(model, batches, optimizer) -> tuple[list[float], list[float]]:
    """The pipeline's reference: accumulation by hand, loss / ACCUMULATION per micro-batch, as the loop does."""
    from tokenformer.evaluation.scoring import window_loss

    losses, norms = [], []
    for batch in batches:
        optimizer.zero_grad()
        total = 0.0
        for micro in batch.split(MICRO):
            loss, _ = window_loss(model, micro)
            (loss / ACCUMULATION).backward()
            total += loss.item() / ACCUMULATION
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        optimizer.step()
        losses.append(total)
    return losses, norms


def pipeline_results(schedule: str) -> dict:
    """Two stages of a 3-layer model take PIPELINE_STEPS AdamW steps of ACCUMULATION micro-batches
    (clipping at 1.0); so does the whole model alone, on the same batches."""
    from tokenformer.parallel.pipeline import Pipeline

    config = resolve_model_config({"name": "tiny", "seq_length": 16, "num_layers": 3})
    torch.manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (MICRO * ACCUMULATION, 17)) for _ in range(PIPELINE_STEPS)]
    torch.manual_seed(0)
    reference = TokenFormer(config)
    initial = {name: p.detach().clone() for name, p in reference.named_parameters()}
    losses, norms = one_process_steps(reference, batches, torch.optim.AdamW(reference.parameters(), lr=3e-3))
    torch.manual_seed(0)
    pipeline = Pipeline(TokenFormer(config), dist.group.WORLD, schedule).start(ACCUMULATION)
    optimizer = torch.optim.AdamW(pipeline.stage.parameters(), lr=3e-3)
    got_losses, got_norms = [], []
    for batch in batches:
        optimizer.zero_grad()
        got_losses.append(pipeline.step(batch))
        got_norms.append(pipeline.clip_gradients(1.0))
        optimizer.step()
    full = dict(reference.named_parameters())
    return {"losses": [abs(a - b) for a, b in zip(got_losses, losses)],
            "norms": [abs(a - b) for a, b in zip(got_norms, norms)],
            "params": {name: (p - full[name]).abs().max().item() for name, p in pipeline.stage.named_parameters()},
            "moved": max((full[name] - p).abs().max().item() for name, p in initial.items())}


@pytest.fixture(scope="module")
def model_level(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp_model")
    mp.spawn(model_level_rank, args=(free_port(), str(out)), nprocs=2)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("norm", NORMS)
def test_token_parallel_model_gives_one_process_logits_loss_and_gradients(model_level, norm):
    for rank in model_level:
        result = rank[norm]
        assert result["local_tokens"] == 128 // 2  # the tiny ffn's 128 tokens really are split
        assert result["logits"] <= ATOL and result["loss"] <= ATOL
        assert len(result["grads"]) == 1 + 2 + 2 * 5 * 2  # embedding, final norm (2), 2 layers x 5 Pattentions x K,V
        worst = max(result["grads"].items(), key=lambda item: item[1])
        assert worst[1] <= GRAD_RTOL * result["largest_grad"], worst


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm"])
def test_the_analytic_bytes_of_token_parallelism_are_the_bytes_its_collectives_send(model_level, norm):
    """`cost.tp_bytes_per_token` x tokens = what DTensor's collectives sent in one forward and backward
    (counted per collective by its kind and size: tokenformer.parallel.cost.CollectiveBytes)."""
    for rank in model_level:
        assert rank[norm]["sent_bytes"] > 0
        assert rank[norm]["sent_bytes"] == pytest.approx(rank[norm]["predicted_bytes"], rel=1e-9)


def test_cost_model_of_one_rank_holds_the_whole_model_and_its_adam_state():
    from tokenformer.parallel.cost import Layout, Workload, memory_per_rank, stage_parameters

    config = resolve_model_config("150M")
    assert stage_parameters(config, 1) == config.num_parameters
    one = memory_per_rank(config, Layout(), Workload())
    assert one["states"] == 16 * config.num_parameters  # fp32 weights and gradients, two AdamW moments
    sharded = memory_per_rank(config, Layout(dp=4, tp=2, fsdp=True), Workload())
    assert sharded["states"] == pytest.approx(one["states"] / 8)


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm"])
def test_exact_growth_under_token_parallelism_keeps_the_logits(model_level, norm):
    for rank in model_level:
        assert rank[norm]["grown_local_tokens"] == 128  # 256 tokens, half on each rank
        assert rank[norm]["exact_growth"] <= ATOL


@pytest.mark.parametrize("norm", NORMS)
def test_official_growth_under_token_parallelism_equals_one_process_growth(model_level, norm):
    """The same new rows, spread over the ranks in another order: the same function (a Pattention
    does not depend on the order of its tokens); and growth did change it (scale and keys)."""
    for rank in model_level:
        assert rank[norm]["official_growth"] <= ATOL
        assert rank[norm]["official_changed"] > 1e-3


def test_token_parallel_generation_gives_one_process_greedy_tokens_with_a_cache_of_its_heads(model_level):
    for rank in model_level:
        result = rank["generation"]
        assert len(result["tokens"]) == 12 and result["tokens"] == result["expected"]
        assert result["cached_heads"] == result["heads"] // 2


def test_stages_split_the_blocks_consecutively_and_evenly():
    assert stage_layers(3, 2) == [range(0, 2), range(2, 3)]
    assert stage_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_two_stage_pipeline_takes_the_one_process_steps(model_level, schedule):
    """Losses, gradient norms (the tied matrix counted once) and the weights after 3 steps."""
    first, last = (rank[schedule] for rank in model_level)
    for rank in (first, last):
        assert len(rank["losses"]) == PIPELINE_STEPS and max(rank["losses"]) <= ATOL and max(rank["norms"]) <= ATOL
        assert max(rank["params"].values()) <= ATOL, rank["params"]
        assert rank["moved"] > 1e-3  # the steps did change the weights
    # the stages hold their own blocks, and both hold the tied embedding matrix
    assert {"word_embeddings.weight", "layers.0.mlp.key_param_tokens", "layers.1.mlp.key_param_tokens"} \
        <= set(first["params"]) and "layers.2.mlp.key_param_tokens" not in first["params"]
    assert {"word_embeddings.weight", "layers.2.mlp.key_param_tokens", "final_norm.weight"} <= set(last["params"])


# ---- the training loop ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """One process (micro batch 4 x accumulation 2), TP=2 on 2 ranks with the same micro batch, and
    TP=2 x FSDP2=2 on 4 ranks with micro batch 2 (2 data-parallel groups): 8 windows a step each."""
    root = tmp_path_factory.mktemp("tp_runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train(TrainConfig(**run_fields(corpus, root / "one", train_micro_batch_size_per_gpu=4)))
    finally:
        torch.set_num_threads(threads)
    tp = torchrun(run_fields(corpus, root / "tp", train_micro_batch_size_per_gpu=4, tp_size=2))
    assert tp.returncode == 0, tp.stderr[-3000:]
    return {"root": root, "corpus": corpus, "one": one}


def grad_norms(save: Path) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in read_metrics(save / "metrics.jsonl") if "grad_norm" in r}


def test_tp2_training_matches_one_process_losses_and_gradient_norms(runs):
    root = runs["root"]
    assert_same_losses(losses_of(root / "tp"), runs["one"]["losses"])
    assert_same_losses(grad_norms(root / "tp"), grad_norms(root / "one"))
    shards = sorted(p.name for p in (root / "tp" / "step_00000004" / "sharded").glob("*.distcp"))
    assert len(shards) == 2, shards


def test_one_process_resumes_a_tp2_checkpoint_with_the_same_losses(runs):
    """Layout change on resume: the TP=2 run's step-2 DCP shards, resumed by one process, give the
    uninterrupted one-process run's losses at steps 3 and 4."""
    root = runs["root"]
    save = root / "tp_then_one"
    shutil.copytree(root / "tp", save)
    shutil.rmtree(save / "step_00000004")
    (save / "latest").write_text("step_00000002")
    summary = train(TrainConfig(**run_fields(runs["corpus"], save, train_micro_batch_size_per_gpu=4, resume=True)))
    assert sorted(summary["losses"]) == [3, 4]
    assert_same_losses(summary["losses"], {s: runs["one"]["losses"][s] for s in (3, 4)})


def test_convert_consolidates_tp2_shards_into_the_checkpoint_weights(runs):
    step = runs["root"] / "tp" / "step_00000004"
    consolidated = consolidate_sharded(step)
    full = read_safetensors(step / "model.safetensors")
    assert sorted(consolidated) == sorted(full)
    for name, tensor in full.items():
        assert torch.equal(consolidated[name], tensor), name


def test_pp2_resumes_tp2_shards_with_the_one_process_losses(runs):
    """TP=2's step-2 shards, resumed as a two-stage pipeline (1F1B over the 2 accumulation
    micro-batches): steps 3 and 4 give the one-process losses and gradient norms; its own
    checkpoint's model.safetensors holds every stage's weights."""
    root = runs["root"]
    save = root / "tp_then_pp"
    shutil.copytree(root / "tp", save)
    shutil.rmtree(save / "step_00000004")
    (save / "latest").write_text("step_00000002")
    result = torchrun(run_fields(runs["corpus"], save, train_micro_batch_size_per_gpu=4, pp_size=2, resume=True))
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {s: runs["one"]["losses"][s] for s in (3, 4)}
    assert_same_losses({s: v for s, v in losses_of(save).items() if s > 2}, expected)
    assert_same_losses({s: v for s, v in grad_norms(save).items() if s > 2},
                       {s: v for s, v in grad_norms(root / "one").items() if s > 2})
    weights = read_safetensors(save / "step_00000004" / "model.safetensors")
    assert sorted(weights) == sorted(read_safetensors(root / "one" / "step_00000004" / "model.safetensors"))


FOUR_RANKS = {"tp2_x_fsdp2": dict(tp_size=2, parallelism="fsdp2", train_micro_batch_size_per_gpu=2),
              "pp2_x_fsdp2": dict(pp_size=2, parallelism="fsdp2", train_micro_batch_size_per_gpu=2),
              "tp2_x_pp2": dict(tp_size=2, pp_size=2, train_micro_batch_size_per_gpu=4)}  # one data-parallel group


@pytest.mark.parametrize("layout", FOUR_RANKS)
def test_four_ranks_match_one_process(runs, layout):
    """TP=2 x FSDP2=2 and PP=2 x FSDP2=2 (two data-parallel groups, micro batch 2) and TP=2 x PP=2 (each
    stage's two tp ranks; micro batch 4): the one-process losses and gradient norms, 8 windows a step.
    Under TP x PP the first stage's tied-matrix gradient (from the vocabulary-parallel lookup) comes
    back Replicate, the last stage's (from the head) Shard(0): summing them unaligned aborted gloo."""
    root = runs["root"]
    save = root / layout
    result = torchrun(run_fields(runs["corpus"], save, **FOUR_RANKS[layout]), nproc=4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_losses(losses_of(save), runs["one"]["losses"])
    assert_same_losses(grad_norms(save), grad_norms(root / "one"))
    shards = sorted(p.name for p in (save / "step_00000004" / "sharded").glob("*.distcp"))
    assert len(shards) == 4, shards

"""Token parallelism (`tokenformer.parallel.tokens`) on CPU with gloo, against one process.

Model level (two processes from torch.multiprocessing, one launch for everything): for every
norm variant, the token-parallel model's logits, loss and every parameter's gradient equal those
of the same model in one process (each rank computes that reference itself); exact growth under
token parallelism keeps the logits, and official growth gives the logits of the same growth in
one process (the same new rows, in another token order).

Training level (torchrun, `tokenformer train --tp_size 2`): per-step losses and gradient norms of
TP=2, and of TP=2 x FSDP2=2 on 4 ranks, equal one process's with the same global batch; the TP
checkpoints are DCP shards that one process resumes from with the same losses, and that
`convert` consolidates into the weights the checkpoint's model.safetensors holds.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_level_rank(rank: int, port: int, out: str) -> None:
    """One of two ranks: compare the token-parallel model with the one-process model it is built from."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from tokenformer.evaluation.scoring import window_loss
    from tokenformer.parallel.tokens import loss_context, parallelize_tokens
    from tokenformer.scaling.grow import grow

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    results = {}
    for norm in NORMS:
        config = resolve_model_config({"name": "tiny", "seq_length": 16, "norm_activation_type": norm})
        torch.manual_seed(0)
        reference = TokenFormer(config)
        batch = torch.randint(0, config.vocab_size, (3, 17))
        reference_loss, _ = window_loss(reference, batch)
        reference_loss.backward()
        model = parallelize_tokens(TokenFormer(config), mesh)
        # every rank reads the whole state and keeps its shards (as a resume of a full checkpoint does)
        set_model_state_dict(model, reference.state_dict(), options=StateDictOptions(full_state_dict=True))
        with loss_context(True):
            loss, _ = window_loss(model, batch)
            loss.backward()
            logits = model(batch[:, :-1]).full_tensor()
        grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
                 for name, p in model.named_parameters()}
        results[norm] = {
            "local_tokens": model.layers[0].mlp.key_param_tokens.to_local().shape[0],
            "logits": (logits - reference(batch[:, :-1])).abs().max().item(),
            "loss": abs(loss.item() - reference_loss.item()),
            "grads": {name: (grads[name] - p.grad).abs().max().item() for name, p in reference.named_parameters()},
            "largest_grad": max(p.grad.abs().max().item() for p in reference.parameters())}
        with torch.no_grad(), loss_context(True):
            before = model(batch[:, :-1]).full_tensor()
            if norm != "softmax":  # exact growth is defined for the l2 variants only
                exact = grow(model, factor=2.0, mode="exact", seed=1)
                results[norm]["exact_growth"] = (exact(batch[:, :-1]).full_tensor() - before).abs().max().item()
                results[norm]["grown_local_tokens"] = exact.layers[0].mlp.key_param_tokens.to_local().shape[0]
            official = grow(model, factor=2.0, mode="official", seed=1)(batch[:, :-1]).full_tensor()
            one_process = grow(reference, factor=2.0, mode="official", seed=1)(batch[:, :-1])
            results[norm]["official_growth"] = (official - one_process).abs().max().item()
            results[norm]["official_changed"] = (official - before).abs().max().item()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


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


@pytest.mark.skipif(os.environ.get("TOKENFORMER_SLOW_TESTS") != "1",
                    reason="4 ranks on 2 cores, ~25 s: set TOKENFORMER_SLOW_TESTS=1")
def test_tp2_x_fsdp2_on_four_ranks_matches_one_process(runs):
    root = runs["root"]
    result = torchrun(run_fields(runs["corpus"], root / "tp_fsdp", train_micro_batch_size_per_gpu=2, tp_size=2,
                                 parallelism="fsdp2"), nproc=4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_losses(losses_of(root / "tp_fsdp"), runs["one"]["losses"])
    assert_same_losses(grad_norms(root / "tp_fsdp"), grad_norms(root / "one"))

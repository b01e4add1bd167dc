"""The benchmarks' shared plumbing (bench/common.py, bench/timing.py) and the GPU suite's dry run
(bench/gpu.py --device cpu --tiny): argument handling, the datasheet table and MFU arithmetic on
fake device names, alternation order, the decode merge of bench/compare.py, and the JSON gpu.py
writes. Benchmarks are not tests: no speed is asserted here, only plumbing and arithmetic."""

import argparse
import json
import socket
import subprocess
import sys
import time

import pytest
import torch

from bench import common, compare, fsdp_step, gpu, gpu_checks, gpu_speed, timing
from tokenformer import Config
from tokenformer.flops import gpt_neox_flops, tokenformer_flops

pytestmark = pytest.mark.usefixtures("one_thread_module")


def parse(argv: list[str], **kwargs) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    common.add_device_arguments(parser, **kwargs)
    return parser.parse_args(argv)


# ---- arguments ----------------------------------------------------------------------------------

def test_device_arguments_defaults_and_choices():
    args = parse([])
    assert (args.device, args.dtype, args.threads) == ("auto", "fp32", None)
    assert parse([], dtype="bf16", threads=1).dtype == "bf16"
    assert parse([], threads=1).threads == 1
    args = parse(["--device", "cpu", "--dtype", "bf16", "--threads", "2"])
    assert (args.device, args.dtype, args.threads) == ("cpu", "bf16", 2)
    assert not hasattr(parse([], with_threads=False), "threads")
    for bad in (["--dtype", "fp16"], ["--device", "tpu"]):
        with pytest.raises(SystemExit):
            parse(bad)


def test_resolve_gives_device_dtype_and_threads():
    threads = torch.get_num_threads()
    try:
        run = common.resolve(parse(["--device", "cpu", "--dtype", "bf16", "--threads", "1"]))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert run.device == torch.device("cpu") and run.dtype is torch.bfloat16 and not run.cuda
    assert common.resolve(parse(["--device", "auto"])).device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_resolve_cuda_without_a_gpu_is_one_sentence():
    with pytest.raises(SystemExit, match="no CUDA GPU: use --device cpu"):
        common.resolve(parse(["--device", "cuda"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_suite_without_a_gpu_stops_unless_asked_for_a_dry_run(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU.*--device cpu"):
        gpu.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown part 'train'"):
        gpu.main([str(tmp_path), "--device", "cpu", "--only", "pattention,train"])
    assert not any(tmp_path.iterdir())


# ---- peak FLOP/s and MFU -----------------------------------------------------------------------

@pytest.mark.parametrize("name, dtype, tflops", [
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100 80GB PCIe", "fp32", 19.5),
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0),   # the SXM card's name
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H100 NVL", "fp32", 60.0),
    ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA L40S", "bf16", 362.0),
    ("NVIDIA A10", "fp32", 31.2),
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
    ("Tesla V100-SXM2-16GB", "fp32", 15.7),
    ("Tesla V100-PCIE-32GB", "fp32", 14.0),
])
def test_datasheet_peak_by_device_name(name, dtype, tflops):
    assert common.datasheet_peak(name, dtype) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name, dtype", [
    ("NVIDIA A10G", "bf16"),          # not the A10 (nor an A100): no datasheet figure here
    ("Tesla V100-SXM2-16GB", "bf16"),  # no bf16 tensor cores
    ("NVIDIA Imaginary 9000", "fp32"),
])
def test_datasheet_peak_unknown_is_none(name, dtype):
    assert common.datasheet_peak(name, dtype) is None


def test_peak_flops_on_a_fake_gpu_uses_the_datasheet_or_says_it_measured(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    monkeypatch.setattr(common, "measured_peak", lambda device, dtype, n=None: 7.0e12)
    peak, source = common.peak_flops(cuda, "bf16")
    assert peak == 121e12 and source == "datasheet dense bf16 peak of the NVIDIA L4"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Imaginary 9000")
    peak, source = common.peak_flops(cuda, "fp32")
    assert peak == 7.0e12 and "measured fp32 matmul" in source and "not in" in source


def test_mfu_arithmetic():
    # a 150M-shaped step: 6 GFLOP per token x 8192 tokens in 0.25 s on an A100 (bf16 312 TFLOP/s)
    peak = common.datasheet_peak("NVIDIA A100-SXM4-40GB", "bf16")
    assert common.mfu(6e9 * 8192, 0.25, peak) == pytest.approx(6e9 * 8192 / 0.25 / 312e12)
    assert common.mfu(6e9 * 8192, 0.25, peak) == pytest.approx(0.63015, abs=1e-5)


def test_measured_peak_is_the_matmul_rate(monkeypatch):
    # 2 n^3 FLOPs over the median time alternate reports
    monkeypatch.setattr(common, "alternate", lambda fns, reps: {"gemm": 0.5})
    assert common.measured_peak(torch.device("cpu"), "fp32", n=64) == 2 * 64 ** 3 / 0.5


# ---- timing -------------------------------------------------------------------------------------

def test_alternate_takes_turns_and_reports_medians(monkeypatch):
    calls: list[str] = []
    durations = {"a": [5.0, 1.0, 3.0], "b": [2.0, 2.0, 9.0]}
    now = [0.0]

    def make(name):
        def fn():
            calls.append(name)
            if len(calls) > 2:  # after the warm-up round each call lasts its next duration
                now[0] += durations[name].pop(0)
        return fn

    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    result = common.alternate({"a": make("a"), "b": make("b")}, reps=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert result == {"a": 3.0, "b": 2.0}


# ---- bench.compare's decode merge ---------------------------------------------------------------

def test_merge_decode_keeps_item_4_and_takes_the_decode_suite():
    result = {"decode_speed_ratio": 0.84, "decode_tokens_per_s": {"ours": 30.0, "hf": 36.0}, "device": "cpu"}
    decode = {"decode_speed_ratio": 1.1, "memory_bandwidth_gb_s": 12.0, "device": "cuda",
              "decode_tokens_per_s": {"ours_plain": 20.0}, "rows": [("decode, best", 1.1, "x HF generate", ">= 1.0")]}
    rows = compare.merge_decode(result, decode)
    assert rows == [("decode, best", 1.1, "x HF generate", ">= 1.0")] and result["decode_rows"] == rows
    assert result["decode_speed_ratio"] == 1.1 and result["generation_decode_speed_ratio"] == 0.84
    assert result["memory_bandwidth_gb_s"] == 12.0
    # the suite's own metadata and timings stay under "decode": item 4's and compare's keys are intact
    assert result["device"] == "cpu" and result["decode_tokens_per_s"] == {"ours": 30.0, "hf": 36.0}
    assert result["decode"]["device"] == "cuda" and "rows" not in result["decode"]
    assert [row[0] for row in compare.table_rows({**TABLE_KEYS, **result})][-1] == "decode, best"


# the other figures table_rows reads (values do not matter for the order of its rows)
TABLE_KEYS = dict.fromkeys(["pattention_speedup_eager", "pattention_speedup_compiled", "pattention_speedup_lean",
                            "pattention_memory_saving_lean", "pattention_memory_saving", "step_flops_ratio",
                            "body_flops_ratio", "mfu_fp32", "mfu_fp32_body", "mfu_fp32_hf", "prefill_speed_ratio",
                            "prefill_flops_ratio", "step_memory_saving", "step_memory_saving_lean"], 1.0)


# ---- the GPU suite's dry run --------------------------------------------------------------------

def in_process_torchrun(monkeypatch) -> list[list[str]]:
    """gpu_checks' `torchrun --nproc_per_node 1 -m bench.fsdp_step ...`, run as one rank in this
    process: torchrun's launch costs two Python start-ups (half a minute on a busy machine), and
    what it sets up for one rank is these environment variables. Returns the commands seen."""
    seen: list[list[str]] = []
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                "-m", "bench.fsdp_step"]

    def run(command, **kwargs):
        seen.append(command)
        assert command[:len(launcher)] == launcher
        with socket.socket() as probe:  # a free port for the one-rank rendezvous
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
            monkeypatch.setenv(key, value)
        fsdp_step.main(command[len(launcher):])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(gpu_checks.subprocess, "run", run)
    return seen


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """`bench/gpu.py OUT --device cpu --tiny` once for the module's tests: (result, OUT, torchrun commands).

    torch.compile is torch's to test (tests/test_model.py and tests/test_decode.py trace the model and
    the decode step with aot_eager) and its tracing is half the dry run's time on a busy CPU: here the
    compiled module is the eager one, and the plumbing around it is what is checked."""
    monkeypatch = pytest.MonkeyPatch()
    try:
        monkeypatch.setattr(torch, "compile", lambda model=None, **kwargs: model)
        commands = in_process_torchrun(monkeypatch)
        out = tmp_path_factory.mktemp("gpu")
        result = gpu.main([str(out), "--device", "cpu", "--tiny", "--threads", "1"])
    finally:
        monkeypatch.undo()
    return result, out, commands


def test_dry_run_runs_every_part_and_writes_json_and_log(dry_run):
    result, out, _ = dry_run
    assert json.loads((out / "gpu.json").read_text()) == json.loads(json.dumps(result, default=str))
    log = (out / "gpu.log").read_text()
    assert list(result["parts"]) == [name for name, _, _ in gpu.PARTS]
    for name, part in result["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"), part.get("failed_checks"))
        assert part["seconds"] > 0 and part["peak_memory_gib"] is None  # no device memory on the CPU
        assert f"[{name}] ok in" in log
    assert result["summary"]["parts_not_ok"] == {} and result["summary"]["checks_failed"] == []
    assert result["tiny"] and result["device"] == "cpu" and result["seconds"] < result["budget_s"]


def test_dry_run_correctness_figures_are_measured_and_within_their_limits(dry_run):
    parts = {name: part["result"] for name, part in dry_run[0]["parts"].items()}
    errors = parts["logits"]["relative_error"]
    assert set(errors) == {"l2_norm_gelu", "gelu_l2_norm", "softmax"}
    for variant, e in errors.items():
        # measured, not a self-comparison: bf16 is far from float64, fp32 close but not equal
        assert 0 < e["fp32"] < gpu_checks.FP32_TOLERANCE < 1e-3 < e["bf16_weights_rounded_float64"]
        assert e["bf16_limit"] == max(gpu_checks.BF16_TOLERANCE, 4 * e["bf16_weights_rounded_float64"])
        assert e["bf16_weights_rounded_float64"] < e["bf16_autocast"] < e["bf16_limit"]
    grads = parts["gradients"]
    assert 0 < grads["fp32"]["relative_error"] < gpu_checks.FP32_TOLERANCE < grads["bf16_autocast"]["relative_error"]
    assert grads["fp32"]["loss"] == pytest.approx(grads["loss_float64"], rel=1e-6)
    for precision in ("bf16", "fp16"):
        run = parts["training"][precision]
        assert 4 < run["first_loss"] < 8  # about ln(257) = 5.55 at the start
        assert run["loss_ratio"] < gpu_checks.LOSS_FALL_LIMIT and len(run["losses"]) == gpu.SHAPES["tiny"]["loop"]["steps"]
    steps = gpu.SHAPES["tiny"]["loop"]["resume_steps"]
    assert parts["resume"]["resumed_from"].endswith(f"step_{steps // 2:08d}")
    assert set(parts["resume"]["largest_difference"].values()) == {0.0}
    assert parts["hf_generate"]["fp32"]["hf"] == parts["hf_generate"]["fp32"]["native"]
    assert len(parts["hf_generate"]["fp32"]["native"]) == gpu.SHAPES["tiny"]["decode_new_tokens"]
    compiled = parts["compile"]
    assert compiled["decode_tokens"]["compiled"] == compiled["decode_tokens"]["plain"]
    assert compiled["gradient_relative_difference"] < gpu_checks.FP32_TOLERANCE


def test_dry_run_fsdp_part_compares_the_sharded_steps_with_an_unsharded_copy(dry_run):
    _, _, commands = dry_run
    assert [dict(zip(c[8::2], c[9::2]))["--dtype"] for c in commands] == ["fp32", "bf16"]
    assert all("--reference" in c for c in commands)
    fsdp, f = dry_run[0]["parts"]["fsdp"]["result"], gpu.SHAPES["tiny"]["fsdp"]
    for dtype in ("fp32", "bf16"):
        eager = fsdp[dtype]["variants"]["eager"]
        assert eager["sharded"] is True and len(eager["losses"]) == len(eager["reference_losses"]) == f["steps"] + 1
        assert eager["loss_relative_difference"] == max(abs(a - b) / b for a, b in
                                                        zip(eager["losses"], eager["reference_losses"]))


def test_dry_run_speed_figures_follow_from_their_timings(dry_run):
    parts = {name: part["result"] for name, part in dry_run[0]["parts"].items()}
    peaks = parts["environment"]["peaks"]
    assert peaks["bf16_matmul_flops"] > 0 and peaks["copy_bytes_per_s"] > 0
    train, t = parts["train_mfu"], gpu.SHAPES["tiny"]["train"]
    assert train["micro_batch"] == max(t["candidates"]) and set(train["micro_batch_tried"].values()) == {"fits"}
    config = Config.from_name(t["preset"], seq_length=t["seq"])
    tokens = train["micro_batch"] * t["seq"]
    assert train["flops_per_step"] == tokenformer_flops(config).training().total * tokens
    for name in ("eager", "compiled"):
        v = train[name]
        assert v["tokens_per_s"] == pytest.approx(tokens / v["seconds_per_step"])
        assert v["mfu"] == pytest.approx(train["flops_per_step"] / v["seconds_per_step"] / peaks["bf16_matmul_flops"])
        assert train[f"{name}_flops_ratio_vs_hf"] == pytest.approx(v["flops_per_s"] / train["hf"]["flops_per_s"])
    hf = train["hf"]
    h = config.hidden_size
    assert hf["flops_per_step"] == gpt_neox_flops(h, config.num_layers, 4 * h, config.padded_vocab_size,
                                                  t["seq"]).training().total * hf["micro_batch"] * t["seq"]
    p = parts["pattention"]
    assert p["pattention_speedup_compiled"] == pytest.approx(p["pattention_seconds"]["official"]
                                                            / p["pattention_seconds"]["compiled"])
    for part, batch in (("decode", 1), ("decode_batched", gpu.SHAPES["tiny"]["decode"]["batch"])):
        d = parts[part]
        tps = d["decode_tokens_per_s"]
        assert d["batch"] == batch and set(tps) == set(gpu.SHAPES["tiny"]["decode"]["paths"]) and min(tps.values()) > 0
        best = d["best_fp32_path"]
        assert d["decode_speed_ratio"] == pytest.approx(tps[best] / tps["hf"])
        bandwidth = d["memory_bandwidth_gb_s"] * 1e9
        assert d["decode_roofline_fraction"] == pytest.approx(d["bytes_per_step_all"][best] * tps[best] / batch / bandwidth)
        assert d["roofline_tokens_per_s"][best] == pytest.approx(tps[best] / d["decode_roofline_fraction"])
    summary = dry_run[0]["summary"]
    assert summary["train_mfu_compiled"] == train["compiled"]["mfu"] and summary["decode_speed_ratio_batch_1"] > 0


def test_a_part_that_fails_is_recorded_and_the_rest_still_run_within_the_budget(tmp_path, monkeypatch):
    def boom(suite):
        raise RuntimeError("a kernel broke")

    def slow(suite):
        time.sleep(30)

    parts = [("boom", boom, 0), ("missed", lambda s: {"checks": {"x": gpu_checks.check(2.0, 1.0)}}, 0),
             ("fine", lambda s: {"checks": {"y": gpu_checks.check(0.5, 1.0)}}, 0), ("slow", slow, 0),
             ("after", lambda s: {}, 1)]
    monkeypatch.setattr(gpu, "PARTS", parts)
    started = time.perf_counter()
    result = gpu.main([str(tmp_path), "--device", "cpu", "--budget", "1.5"])
    assert time.perf_counter() - started < 10  # the slow part was cut at the budget
    status = {name: part["status"] for name, part in result["parts"].items()}
    assert status == {"boom": "error", "missed": "failed", "fine": "ok", "slow": "timeout", "after": "skipped"}
    assert result["parts"]["boom"]["error"] == "RuntimeError: a kernel broke"
    assert "a kernel broke" in (tmp_path / "gpu.log").read_text()  # with its traceback
    assert result["summary"]["checks_failed"] == ["missed.x"]
    assert json.loads((tmp_path / "gpu.json").read_text())["parts"]["after"]["status"] == "skipped"


def test_largest_micro_batch_stops_at_the_first_that_runs_out_of_memory():
    def make_step(micro_batch):
        def step():
            if micro_batch > 8:
                raise torch.OutOfMemoryError("CUDA out of memory")
        return step
    assert gpu_speed.largest_micro_batch(make_step, [2, 4, 8, 16, 32], torch.device("cpu")) == \
        (8, {2: "fits", 4: "fits", 8: "fits", 16: "out of memory"})
    assert gpu_speed.largest_micro_batch(make_step, [16], torch.device("cpu")) == (None, {16: "out of memory"})

"""The benchmarks' shared plumbing (bench/common.py, bench/timing.py) and the GPU suite's dry run
(bench/gpu.py --device cpu --tiny): argument handling, the datasheet table and MFU arithmetic on
fake device names, alternation order, the decode merge of bench/compare.py, and the JSON gpu.py
writes. Benchmarks are not tests: no speed is asserted here, only plumbing and arithmetic."""

import argparse
import json
import socket
import subprocess
import sys

import pytest
import torch

from bench import common, compare, fsdp_step, gpu, timing
from tokenformer import Config, TokenFormer
from tokenformer.flops import tokenformer_flops

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
        gpu.main(["--out", str(tmp_path / "gpu.json")])
    with pytest.raises(SystemExit, match="unknown section 'train'"):
        gpu.main(["--device", "cpu", "--only", "pattention,train"])


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
    """gpu.py's `torchrun --nproc_per_node 1 -m bench.fsdp_step ...`, run as one rank in this
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

    monkeypatch.setattr(gpu.subprocess, "run", run)
    return seen


def test_gpu_dry_run_writes_the_documented_json(tmp_path, monkeypatch):
    # torch.compile is torch's to test and costs tens of seconds on a busy CPU: the plumbing around
    # it is what is checked here (the compiled module is the eager one).
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    commands = in_process_torchrun(monkeypatch)
    out = tmp_path / "gpu.json"
    result = gpu.main(["--device", "cpu", "--tiny", "--only", "pattention,fsdp", "--out", str(out),
                       "--threads", "1"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str))
    assert result["tiny"] and result["device"] == "cpu" and "decode" not in result

    p = gpu.SHAPES["tiny"]["pattention"]
    h, tokens = p["hidden"], p["pattention_tokens"]
    for dtype in ("fp32", "bf16"):
        section = result["pattention"][dtype]
        positions = tokens // p["batch"]
        assert section["pattention_shape"] == f"x ({p['batch']}, {positions}, {h}), {4 * h} tokens, {h} -> {h}"
        assert set(section["pattention_seconds"]) == {"official", "ours", "lean", "compiled"}
        assert section["flops"] == 3 * tokens * 2 * 4 * h * (h + h)  # hand count: 3 x (2 n d_in + 2 n d_out)
        for name, seconds in section["pattention_seconds"].items():
            assert section["mfu"][name] == pytest.approx(section["flops"] / seconds / section["peak_flops"])
        speedup = section["pattention_seconds"]["official"] / section["pattention_seconds"]["compiled"]
        assert section["pattention_speedup_compiled"] == pytest.approx(speedup)
        assert result["summary"][f"pattention_speedup_compiled_{dtype}"] == section["pattention_speedup_compiled"]
        assert section["pattention_saved_bytes"]["official"] > section["pattention_saved_bytes"]["lean"] > 0

    fsdp, f = result["fsdp"], gpu.SHAPES["tiny"]["fsdp"]
    (command,) = commands
    options = dict(zip(command[8::2], command[9::2]))  # after `... -m bench.fsdp_step`
    assert options["--device"] == "cpu" and options["--dtype"] == "bf16" and options["--preset"] == f["preset"]
    assert (fsdp["preset"], fsdp["seq"], fsdp["ranks"], fsdp["dtype"]) == (f["preset"], f["seq"], 1, "bf16")
    config = Config.from_name(f["preset"], seq_length=f["seq"])
    eager = fsdp["variants"]["eager"]
    assert eager["parameters"] == TokenFormer(config).num_parameters() and eager["sharded"] is True
    assert eager["flops_per_step"] == tokenformer_flops(config).training().total * f["micro_batch"] * f["seq"]
    assert eager["tokens_per_s"] == pytest.approx(f["micro_batch"] * f["seq"] / eager["seconds_per_step"])
    assert eager["mfu"] == pytest.approx(eager["flops_per_step"] / eager["seconds_per_step"] / fsdp["peak_flops"])
    assert 0 < eager["last_loss"] < 2 * torch.log(torch.tensor(float(config.vocab_size)))
    assert result["summary"]["fsdp_eager_tokens_per_s"] == eager["tokens_per_s"]


def test_gpu_decode_section_takes_the_decode_suite(monkeypatch):
    seen = {}

    def fake_run(device, dtype, shape):
        seen.update(shape=shape, device=device, dtype=dtype)
        return {"decode_speed_ratio": 1.2, "decode_compiled_speedup": 1.7, "rows": [("a", 1.2, "x", "")]}

    monkeypatch.setattr(gpu.decode, "run", fake_run)
    section = gpu.decode_section(True, common.Run(torch.device("cpu"), "bf16"))
    assert seen == {"shape": "quick", "device": "cpu", "dtype": "bf16"}
    assert section["rows"] == [["a", 1.2, "x", ""]]
    assert gpu.summary({"decode": section}) == {"decode_speed_ratio": 1.2, "decode_compiled_speedup": 1.7}

"""Mutation testing of the core with mutmut: does the suite turn red when the code is wrong?

    make mutants                                   # every module below (about an hour on 2 cores)
    python -m reliability.mutants --modules generate.py decode.py --selection old

mutmut (pinned in the dev extra) rewrites one module at a time into many mutants (an operator, a
constant, an argument changed) and runs, for each, the tests that call the mutated function; a
mutant is killed when one fails. Each module runs in its own scratch copy of the repository
(runs/mutants/NAME, so that the working tree is never touched) with a targeted test selection:
the test files that exercise that module (`MODULES`), not the whole suite, one child at a time. mutmut skips decorated functions: in the scratch copy
a module-level `@torch.no_grad()` is applied after the definition instead (`undecorate`), so that
generate_tokens, generate_batch and grow_pattention are mutated too.
`--selection old` runs only the files that existed before the mutation work (the "before" score);
`all` adds the files written to kill survivors. Tests that torch.compile are left out (`SKIP`: dynamo
does not trace mutmut's trampolines); the compiled paths have their own tests in the suite.

Writes reliability/results/mutants-SELECTION.json: per module, killed / survived / timed out / no
tests, and each survivor with its changed line, marked `equivalent` with the reason when it is
listed in `EQUIVALENT` (a mutant no test can kill because it computes the same thing). The report,
scores and equivalents explained, is docs/reliability.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "reliability" / "results"

# module (under tokenformer/) -> (test files that existed before, test files added to kill survivors)
MODULES: dict[str, tuple[list[str], list[str]]] = {
    "models/pattention.py": (["test_pattention.py", "test_scaling.py"], ["test_grown_paths.py", "test_core_edges.py"]),
    "decode.py": (["test_decode.py"], ["test_grown_paths.py", "test_core_edges.py"]),
    "generate.py": (["test_generate.py", "test_decode.py"], ["test_sampling.py", "test_core_edges.py", "test_captioner.py"]),
    "scaling/grow.py": (["test_scaling.py", "test_tune.py"], ["test_grown_paths.py", "test_core_edges.py",
                                                            "test_grow_edges.py"]),
    "evaluation/scoring.py": (["test_perplexity.py"], ["test_scoring_edges.py"]),
    "training/optim.py": (["test_train.py"], ["test_optim_edges.py"]),
    "training/checkpointing.py": (["test_train.py"], ["test_checkpointing_edges.py"]),
    "data/windows.py": (["test_train.py", "test_indexed_dataset.py"], ["test_validation_data.py", "test_windows_edges.py"]),
    "data/indexed.py": (["test_indexed_dataset.py"], ["test_indexed_edges.py"]),
    "training/loop.py": (["test_train.py"], ["test_validation_data.py", "test_loop_edges.py"]),
    "models/lm.py": (["test_model.py"], ["test_grown_paths.py", "test_core_edges.py", "test_lm_edges.py"]),
    "models/config.py": (["test_model.py", "test_config.py"], ["test_config_edges.py"]),
    "models/quantize.py": (["test_decode.py"], ["test_core_edges.py", "test_quantize_edges.py"]),
    "models/official.py": (["test_convert.py", "test_model.py"], ["test_official_edges.py"]),
    "models/pretrained.py": (["test_model.py", "test_checkpoint.py"], ["test_official_edges.py"]),
    "models/vision.py": (["test_vision.py"], ["test_vision_edges.py"]),
    "models/clip.py": (["test_clip.py"], ["test_clip_edges.py"]),
    "models/captioner.py": (["test_captioner.py"], ["test_captioner_edges.py"]),
    "scaling/shrink.py": (["test_scaling.py"], ["test_shrink_edges.py"]),
    "scaling/freeze.py": (["test_scaling.py", "test_warm_start.py"], ["test_freeze_edges.py"]),
    "scaling/tune.py": (["test_tune.py"], ["test_tune_edges.py"]),
}

PROBE_ON_CPU = "the probe's tensor made on the default device: the CPU, where the probe runs here (on a GPU it would differ)"

# Mutants that compute the same thing as the original: no test can tell them apart. Name -> why, or
# name -> (the changed line, why) where the module has changed since and the name may mean another mutant.
EQUIVALENT: dict[str, str | tuple[str, str]] = {
    "tokenformer.scaling.tune.x_load_adapters__mutmut_55": (
        'tuned = grow(base, mode="exact", generator=torch.Generator().manual_seed(1),',
        "the seed of the grown rows, every one of which the adapters' rows overwrite next (a group's added count "
        "is the adapters' sum, the same in each of its Pattentions); a private generator either way"),
    "tokenformer.models.captioner.xǁCaptionerǁforward__mutmut_9": (
        "prefix = None",
        "the prefix length None before the first pass sets it: a later pass slices x[:, None:], all of x, as x[:, 0:]"),
    "tokenformer.models.quantize.x_packed_kernel_works__mutmut_12": (
        'x = torch.ones(1, 64, device=None, dtype=dtype)',
        PROBE_ON_CPU),
    "tokenformer.models.quantize.x_packed_kernel_works__mutmut_23": (
        'q = torch.ones(8, 64, device=None, dtype=torch.int8)',
        PROBE_ON_CPU),
    "tokenformer.models.quantize.x_packed_kernel_works__mutmut_27": (
        'q = torch.ones(8, 64, dtype=torch.int8)',
        PROBE_ON_CPU),
    "tokenformer.models.quantize.x_packed_kernel_works__mutmut_39": (
        'out = torch.ops.aten._weight_int8pack_mm(x, q, torch.ones(8, device=None, dtype=dtype))',
        PROBE_ON_CPU),
    "tokenformer.training.loop.x_resume__mutmut_20": (
        'growth_schedule.catch_up(run, int(latest.name.rsplit("_", )[-1]))',
        "rsplit without a limit: the last piece of `step_NNNNNNNN` is the same however many splits are made"),
    "tokenformer.training.loop.x_run_distributed__mutmut_24": (
        'with claim_dir(save, claim.command, resume=claim.resume, overwrite=getattr(claim, "overwrite", None),',
        "None for False as the default of a config without `overwrite`: the write door only asks whether it is set"),
    "tokenformer.models.lm.xǁKVCacheǁallocate__mutmut_10": (
        "return cls([torch.empty(shape, dtype=dtype) for _ in range(config.num_layers)],",
        "the cache allocated on the default device: the CPU, where this runs (on a GPU it would differ)"),
    "tokenformer.data.indexed.xǁIndexedDatasetǁ__init____mutmut_92":
        "the byte count divided by the item size instead of multiplied: it is only asked whether it is 0, which "
        "both are exactly when the sizes sum to 0",
    "tokenformer.data.windows.xǁWindowDatasetǁ__init____mutmut_26":
        "the sizes of no dataset as float64 zeros instead of int32: their sum is 0 either way, and the next line "
        "refuses the empty data with the same sentence",
    "tokenformer.data.windows.xǁWindowDatasetǁ_epoch__mutmut_24":
        "np.cumsum without dtype into an int64 `out`: numpy accumulates int32 sizes in the default integer, int64",
    "tokenformer.evaluation.scoring.x_score_windows__mutmut_82":
        "log_softmax without dim on the (k, V) log-probabilities: the implicit dim of a 2-D input is 1, the last",
    "tokenformer.evaluation.scoring.x_mean_loss__mutmut_7":
        "the totals built on the default device: the CPU, where this runs and where the model is (on a GPU they "
        "would differ)",
    "tokenformer.scaling.grow.x_grow_optimizer_state__mutmut_33": (
        "if value.shape[1:] != target.shape[1:] or value.shape[0] >= target.shape[0]:",
        "`>=` for `>` on the row counts: the line is reached only when the shapes differ, so equal row counts "
        "mean the other dims differ and the first test of the `or` raises either way"),
    "tokenformer.generate.x_sample_next__mutmut_43": "torch.sort without dim sorts the last dim: the same call",
    "tokenformer.generate.x_sample_next__mutmut_80": "the logits are (B, V): softmax over dim 1 is over dim -1",
    "tokenformer.generate.x_generate_caption__mutmut_33": "torch.full with an int fill value makes int64 anyway",
    "tokenformer.models.pattention.xǁPattentionǁforward__mutmut_12":
        "autocast left on inside the custom function: its inputs are already in the autocast dtype, so the "
        "matmuls run in it either way, and none of its other ops is on CPU autocast's float32 list",
    "tokenformer.models.pattention.xǁPattentionǁforward__mutmut_13": "the same as forward__mutmut_12 (enabled=True)",
    "tokenformer.decode.xǁDecoderǁ__init____mutmut_38":
        "the final LayerNorm built on the default device: the CPU, where this runs (on a GPU it would differ; "
        "its load_state_dict copies the values either way)",
    "tokenformer.decode.xǁDecoderǁallocate_cache__mutmut_12":
        "rebuilding the rotary tables when they are exactly long enough gives the same tables",
}


def scratch_copy(directory: Path) -> None:
    """Copy the repository's tracked and not-ignored files into `directory` (over what is there)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for relative in files:
        source = ROOT / relative
        if source.is_file():
            (directory / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, directory / relative)


def undecorate(path: Path) -> int:
    """Move each module-level `@torch.no_grad()` below the module as `f = torch.no_grad()(f)`: the
    same function (the decorator applied after the definition instead of at it), but one mutmut
    mutates; mutmut leaves decorated functions alone, and generate_tokens, generate_batch and
    grow_pattention carry this one. Returns how many were moved."""
    lines = path.read_text().splitlines(keepends=True)
    names = []
    for i, line in enumerate(lines):
        match = re.match(r"def (\w+)\(", lines[i + 1]) if line == "@torch.no_grad()\n" and i + 1 < len(lines) else None
        if match:
            names.append(match.group(1))
            lines[i] = ""
    if names:
        lines.append("\n\n" + "".join(f"{name} = torch.no_grad()({name})\n" for name in names))
        path.write_text("".join(lines))
    return len(names)


# torch.compile cannot trace mutmut's trampolines: these tests compile (their names say so)
SKIP = "not compile and not decode_flags"


ALSO_COPY = ("configs", "examples", "docs", "bench", "experiments", "reliability", "README.md", "Makefile",
             "constraints.txt")


def write_config(directory: Path, module: str, tests: list[str]) -> None:
    lines = ["[mutmut]", "source_paths=tokenformer", f"only_mutate=tokenformer/{module}",
             "pytest_add_cli_args_test_selection=", *(f"    tests/{t}" for t in tests),
             "pytest_add_cli_args=", *(f"    {a}" for a in ("-p", "no:cacheprovider", "-q", "-x", "-k", SKIP)),
             "process_isolation=forkserver",
             # what tests read besides tests/ (mutmut runs them in mutants/, a copy of the sources)
             "also_copy=", *(f"    {p}" for p in ALSO_COPY), ""]
    (directory / "setup.cfg").write_text("\n".join(lines))


def changed_line(directory: Path, mutant: str) -> str:
    """The first added line of `mutmut show MUTANT`'s diff: what the mutant changed."""
    shown = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant], cwd=directory,
                           capture_output=True, text=True).stdout
    added = [line[1:].strip() for line in shown.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return added[0] if added else shown.strip()[-200:]


def run_module(module: str, selection: str, before: dict | None, children: int = 1,
               sample: int | None = None, survivors_of_changed: bool = False) -> dict:
    """Mutate `module` and run its tests of `selection` on each mutant. With `before` (the old
    selection's result, same source), only its survivors run again: a mutant the old tests kill
    stays killed when tests are added, so the rest of the run would repeat itself."""
    from mutmut.stats import status_by_exit_code

    old, new = MODULES[module]
    tests = [t for t in old + (new if selection == "all" else []) if (ROOT / "tests" / t).is_file()]
    directory = ROOT / "runs" / "mutants" / module.replace("/", "-").removesuffix(".py")
    source = hashlib.sha256((ROOT / "tokenformer" / module).read_bytes()).hexdigest()
    same = before is not None and (before.get("source") == source or survivors_of_changed)
    rerun = same and (directory / "mutants").is_dir()
    # the tests' contents too: a mutant's result from before a test changed must not be kept
    stamp = " ".join([source, *(f"{t}:{hashlib.sha256((ROOT / 'tests' / t).read_bytes()).hexdigest()[:16]}"
                                for t in tests)])
    resume = (directory / "run.stamp").is_file() and (directory / "run.stamp").read_text() == stamp
    if not (rerun or resume):  # an interrupted run of the same source and tests goes on where it stopped
        shutil.rmtree(directory, ignore_errors=True)
    scratch_copy(directory)
    undecorate(directory / "tokenformer" / module)
    write_config(directory, module, tests)
    (directory / "run.stamp").write_text(stamp)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    meta_path = directory / "mutants" / "tokenformer" / f"{module}.meta"

    def mutmut_run(*names: str) -> None:
        subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *names],
                       cwd=directory, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    if rerun:
        names = [s["mutant"] for s in before["survivors"]]
    elif sample:
        if not meta_path.is_file():
            mutmut_run("no-such-mutant")  # generates the mutants (and the test stats), tests none
        every = sorted(json.loads(meta_path.read_text())["exit_code_by_key"])
        names = sorted(random.Random(0).sample(every, min(sample, len(every))))
    else:
        names = []
    if rerun and meta_path.is_file():  # forget their old results: mutmut may keep them when only tests changed
        meta = json.loads(meta_path.read_text())
        meta["exit_code_by_key"].update({name: None for name in names})
        meta_path.write_text(json.dumps(meta))
    if names or not rerun:
        mutmut_run(*names)
    codes = json.loads(meta_path.read_text())["exit_code_by_key"]
    unchecked = [n for n in (names or codes) if codes.get(n) is None]
    if unchecked:
        raise SystemExit(f"mutmut left {len(unchecked)} mutants of {module} untested (run it in {directory} to see why)")
    counts: dict[str, int] = {"killed": before["counts"].get("killed", 0)} if rerun else {}
    survivors = []
    for mutant in sorted(names if rerun else names or codes):
        status = status_by_exit_code[codes.get(mutant)]
        status = "killed" if status == "segfault" else status
        counts[status] = counts.get(status, 0) + 1
        if status != "killed":
            survivors.append({"mutant": mutant, "status": status, "line": changed_line(directory, mutant),
                              **({"equivalent": EQUIVALENT[mutant]} if mutant in EQUIVALENT else {})})
    return rescore({"tests": tests, "mutants": len(codes), "tested": sum(counts.values()), "counts": counts,
                    "survivors": survivors, "source": source})


def rescore(result: dict) -> dict:
    """Mark the survivors listed in `EQUIVALENT` and compute the score: killed / (tested - equivalent)."""
    for survivor in result["survivors"]:
        survivor.pop("equivalent", None)
        why = EQUIVALENT.get(survivor["mutant"])
        if isinstance(why, tuple):
            why = why[1] if survivor["line"] == why[0] else None
        if why is not None:
            survivor["equivalent"] = why
    result["equivalent"] = sum(1 for s in result["survivors"] if "equivalent" in s)
    result["score"] = round(result["counts"].get("killed", 0) / max(1, result["tested"] - result["equivalent"]), 4)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="*", default=list(MODULES), help="modules under tokenformer/ (default: all)")
    parser.add_argument("--selection", choices=["old", "all"], default="all",
                        help="old: the test files from before the mutation work; all: with the new ones")
    parser.add_argument("--max-children", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument("--sample", type=int, default=None,
                        help="test this many mutants per module, drawn at random (seed 0), instead of all")
    parser.add_argument("--survivors-of-changed", action="store_true",
                        help="with --selection all: run the old survivors again although the module changed since "
                             "(check first that the functions they are in did not)")
    parser.add_argument("--again", action="store_true",
                        help="run the survivors of this selection's last result again (tests added since)")
    parser.add_argument("--rescore", action="store_true",
                        help="only mark the equivalent mutants (EQUIVALENT) in the results written before, and rescore")
    args = parser.parse_args(argv)
    if args.rescore:
        for path in RESULTS.glob("mutants-*.json"):
            path.write_text(json.dumps({m: rescore(r) for m, r in json.loads(path.read_text()).items()}, indent=1) + "\n")
        return 0
    out = RESULTS / f"mutants-{args.selection}.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    old_path = RESULTS / "mutants-old.json"
    before = json.loads(old_path.read_text()) if args.selection == "all" and old_path.is_file() else {}
    if args.again:
        before = dict(results)
    for module in args.modules:
        results[module] = run_module(module, args.selection, before.get(module), args.max_children, args.sample,
                                     args.survivors_of_changed)
        r = results[module]
        print(f"{module}: {r['score']:.1%} of the non-equivalent of {r['tested']} mutants tested (of {r['mutants']}) killed "
              f"({r['counts']}, {r['equivalent']} equivalent)",
              flush=True)
        # after each module (a long run keeps its progress), into what is there now (runs side by side)
        written = json.loads(out.read_text()) if out.is_file() else {}
        out.write_text(json.dumps({**written, module: results[module]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

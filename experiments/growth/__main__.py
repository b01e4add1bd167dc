"""`python -m experiments.growth [--quick] [--in-run] [--out DIR] [--work DIR] [--jobs 2]`

Runs every arm of the protocol (`experiments/growth/protocol.py`) on byte-level State of the Union
addresses (`../shared/data/sotu`; without it, the Python standard library), two at a time, then
writes OUT/growth.json (every arm's curve, seed, FLOPs, the ratios, the gate and the protocol) and
OUT/growth.png. A killed run resumes: finished arms are not trained again. `--quick` runs every arm
on toy budgets in about a minute (a smoke test; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import platform
import sys
import time
from pathlib import Path

from experiments.growth.protocol import Arm, Protocol, arm_flops, arms
from experiments.growth.report import analyse, choose_lr, plot, table
from experiments.growth.run import run_all
from tokenformer.data.prepare import prepare
from tokenformer.files import PREPARE_METADATA_FILE

ROOT = Path(__file__).resolve().parents[2]
SOTU = ROOT.parent / "shared" / "data" / "sotu" / "sotu.jsonl.gz"


def prepare_corpus(work: Path, quick: bool) -> tuple[Path, str]:
    out = work / "data"
    if (out / PREPARE_METADATA_FILE).is_file():
        return out, json.loads((out / PREPARE_METADATA_FILE).read_text()).get("corpus", "?")
    if SOTU.is_file():
        corpus, inputs = "State of the Union addresses (../shared/data/sotu)", [SOTU]
    else:
        corpus, inputs = "Python standard library", None
    meta = prepare(inputs, out, tokenizer="byte", valid_fraction=0.03, max_documents=60 if quick else None,
                   progress=False)
    meta["corpus"] = corpus
    (out / PREPARE_METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out, corpus


def only(all_arms: list[Arm], patterns: list[str]) -> list[Arm]:
    """The arms matching one of `patterns` and, transitively, the arms they start from, in order."""
    by_name = {a.name: a for a in all_arms}
    wanted = {a.name for a in all_arms if any(fnmatch.fnmatchcase(a.name, pattern) for pattern in patterns)}
    todo = list(wanted)
    while todo:
        arm = by_name[todo.pop()]
        for need in (arm.parent, arm.prefix):
            if need is not None and need not in wanted:
                wanted.add(need)
                todo.append(need)
    return [a for a in all_arms if a.name in wanted]


def parse_setting(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=")
    fields = {f.name: f for f in dataclasses.fields(Protocol)}
    if name not in fields:
        raise argparse.ArgumentTypeError(f"unknown protocol field {name!r}: one of {', '.join(fields)}")
    value = json.loads(value.replace("(", "[").replace(")", "]"))
    return name, tuple(value) if isinstance(value, list) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.growth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy budgets: every arm in about a minute")
    parser.add_argument("--in-run", action="store_true",
                        help="the in-run growth protocol (Protocol.in_run: width 32, N = 8000, WSD, growth inside "
                             "one run at 0.25/0.5/0.75 of it); with --quick, its toy version")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default experiments/results, "
                                                               "or runs/growth-quick/results with --quick)")
    parser.add_argument("--work", type=Path, default=None, help="data and runs (default runs/growth[-quick])")
    parser.add_argument("--jobs", type=int, default=2, help="arms at a time, one thread each (1: in this process)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: report on the arms finished so far (a stopped run), leaving out "
                             "the seeds whose from-scratch ladders are incomplete")
    parser.add_argument("--steps", type=int, default=None, help="N, the base's budget (default 2000; quick 24)")
    parser.add_argument("--set", type=parse_setting, action="append", default=[], metavar="FIELD=VALUE",
                        help="a protocol field (experiments/growth/protocol.py), e.g. hidden_size=32")
    parser.add_argument("--only", nargs="+", default=None, metavar="PATTERN",
                        help="run only the arms whose names match one of these shell patterns, and the arms they "
                             "start from (e.g. 'tf/*/seed4' 'tf/in-run-official@0.25/*')")
    parser.add_argument("--seeds", type=int, default=None,
                        help="run only the first this many seeds of each family (default: 3 TokenFormer, 2 Transformer)")
    args = parser.parse_args(argv)
    protocol = Protocol.quick() if args.quick else Protocol.in_run() if args.in_run else Protocol()
    if args.quick and args.in_run:
        protocol = dataclasses.replace(protocol, stage_budgets=(), grow_points=(0.25, 0.5, 0.75))
    changes = {**dict(args.set), **({"steps": args.steps} if args.steps else {})}
    if args.seeds:
        changes.update(tf_seeds=protocol.tf_seeds[:args.seeds], t_seeds=protocol.t_seeds[:args.seeds])
    protocol = dataclasses.replace(protocol, **changes)
    work = args.work or ROOT / "runs" / ("growth-quick" if args.quick else "growth")
    out = args.out or (work / "results" if args.quick else ROOT / "experiments" / "results")
    out.mkdir(parents=True, exist_ok=True)
    began, load_before = time.perf_counter(), os.getloadavg()
    data, corpus = prepare_corpus(work, args.quick)
    all_arms = arms(protocol) if args.only is None else only(arms(protocol), args.only)
    print(f"{len(all_arms)} arms on {corpus}; N = {protocol.steps} steps of {protocol.tokens_per_step} tokens; "
          f"held-out set {protocol.held_out_tokens:,} bytes", flush=True)
    outcomes = run_all(protocol, all_arms, data, work / "runs", args.jobs, choose_lr,
                       say=lambda line: print(line, flush=True), train_missing=not args.report_only)
    all_arms = [a for a in all_arms if a.name in outcomes]
    results = analyse(protocol, all_arms, outcomes)
    wall = time.perf_counter() - began
    report = {"command": "python -m experiments.growth " + " ".join(argv if argv is not None else sys.argv[1:]),
              "corpus": corpus, "protocol": protocol.to_dict(), "lr": {f: choose_lr(protocol, outcomes, f) for f in ("tf", "t")},
              "wall_time_s": wall, "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.jobs} arms at a time, 1 thread each",
              "arms": {a.name: {**outcomes[a.name], "flops": arm_flops(protocol, a), "parent": a.parent}
                       for a in all_arms},
              "results": results, "table": table(protocol, results)}
    (out / "growth.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(protocol, all_arms, outcomes, out / "growth.png")
    print(report["table"])
    print(f"lr: {report['lr']}; wall time {wall / 60:.1f} min; wrote {out / 'growth.json'} and growth.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

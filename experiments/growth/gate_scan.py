"""The regime gate alone, at larger budgets: does the large TokenFormer trained N steps beat the
small one at equal compute? The protocol's comparisons mean something only where it does.

    python -m experiments.growth.gate_scan --steps 2000,6000 [--set hidden_size=32 ...] [--lr 2e-3]

For each N: TF-L for N steps, TF-S for 1.5N and 2.5N steps (seed 0, the protocol's recipe), and
the margin `loss of the small frontier at TF-L's compute - loss of TF-L` (positive: the large model
wins). Writes OUT/growth_gate_scan.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from experiments.growth.__main__ import ROOT, parse_setting, prepare_corpus
from experiments.growth.protocol import Arm, Protocol, arm_flops, loss_at
from experiments.growth.run import run_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.growth.gate_scan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", required=True, help="comma-separated values of N")
    parser.add_argument("--set", type=parse_setting, action="append", default=[], metavar="FIELD=VALUE",
                        help="a protocol field, e.g. hidden_size=32 or small_slots=[32,32,128]")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak lr (default: the main run's TokenFormer lr)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "growth-gate")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    began = time.perf_counter()
    data, corpus = prepare_corpus(ROOT / "runs" / "growth", False)
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        p = dataclasses.replace(Protocol(), steps=steps, **dict(args.set))
        gate_arms = [Arm("tf", "large", 0, 1.0, p.budget_steps(1.0), lr=args.lr)] + \
            [Arm("tf", "small", 0, b, p.budget_steps(b), lr=args.lr) for b in (1.5, 2.5)]
        outcomes = run_all(p, gate_arms, data, args.work / f"N{steps}", args.jobs, lambda _p, _o, _f: args.lr,
                           say=lambda line: print(line, flush=True))
        large = outcomes[gate_arms[0].name]["final_val_loss"]
        compute = arm_flops(p, gate_arms[0])["cumulative"]
        small = [(arm_flops(p, a)["cumulative"], outcomes[a.name]["final_val_loss"]) for a in gate_arms[1:]]
        rows.append({"steps": steps, "protocol": p.to_dict(), "large_loss": large, "large_flops": compute,
                     "small_frontier": small, "margin": loss_at(small, compute) - large})
        print(f"N = {steps}: large {large:.4f}, small frontier at its compute {loss_at(small, compute):.4f}, "
              f"margin {rows[-1]['margin']:+.4f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"corpus": corpus, "lr": args.lr, "rows": rows, "wall_time_s": time.perf_counter() - began}
    (args.out / "growth_gate_scan.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

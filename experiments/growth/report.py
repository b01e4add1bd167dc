"""From the arms' final losses to the answer: per family and seed the from-scratch frontiers, each
grown arm's compute ratios, the regime gate, the loss jump after growth; then means and ranges
over seeds, a Markdown table, and the plot."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from experiments.growth.protocol import (FAMILIES, GROWTH_KINDS, Arm, Protocol, arm_flops, loss_at, mean_and_range,
                                         ratios, std)

GATE_DEVIATIONS = 3


def choose_lr(outcomes: dict[str, dict[str, Any]], family: str) -> float:
    """The sweep's lr with the lowest final loss for `family` (its large model, seed 0)."""
    sweep = [o for name, o in outcomes.items() if name.startswith(f"{family}/sweep/")]
    return min(sweep, key=lambda o: o["final_val_loss"])["lr"]


def analyse(p: Protocol, all_arms: list[Arm], outcomes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    families: dict[str, Any] = {}
    for family in FAMILIES:
        seeds = p.tf_seeds if family == "tf" else p.t_seeds
        per_seed, gate_margins = {}, []
        for seed in seeds:
            def frontier(kind: str) -> list[tuple[float, float]]:
                return [(arm_flops(p, a)["cumulative"], outcomes[a.name]["final_val_loss"]) for a in all_arms
                        if a.family == family and a.kind == kind and a.seed == seed]

            large, small = frontier("large"), frontier("small")
            full_large = max(large)  # the large model at N steps
            gate_margins.append(loss_at(small, full_large[0]) - full_large[1])
            base = next(a for a in all_arms if a.family == family and a.kind == "small" and a.seed == seed
                        and a.budget == 1.0)
            grown = {}
            for arm in (a for a in all_arms if a.family == family and a.seed == seed and a.grown):
                outcome, flops = outcomes[arm.name], arm_flops(p, arm)
                curve = outcome["curve"]
                r = ratios(outcome["final_val_loss"], flops, large, small)
                grown[arm.name] = {
                    "kind": arm.kind, "budget": arm.budget, "final_val_loss": outcome["final_val_loss"],
                    "flops": flops, **{k: {"value": v.flops, "bound": v.bound} for k, v in r.items()},
                    "loss_before_growth": outcomes[base.name]["final_val_loss"],
                    "loss_right_after_growth": curve[0][1], "loss_peak_after_growth": max(l for _, l in curve)}
            per_seed[seed] = {"large_frontier": large, "small_frontier": small, "gate_margin": gate_margins[-1],
                              "grown": grown}
        spread = std(gate_margins)
        mean_margin = sum(gate_margins) / len(gate_margins)
        conclusive = mean_margin > 0 and (len(gate_margins) < 2 or mean_margin > GATE_DEVIATIONS * spread)
        summary = {}
        for kind in GROWTH_KINDS[family]:
            for budget in p.stage_budgets:
                rows = [g for s in per_seed.values() for g in s["grown"].values()
                        if g["kind"] == kind and g["budget"] == budget]
                summary[f"{kind}/{budget:g}N"] = {
                    key: mean_and_range([r[key]["value"] if isinstance(r[key], dict) else r[key] for r in rows])
                    for key in ("R_incl", "R_excl", "R_best", "final_val_loss", "loss_right_after_growth",
                                "loss_peak_after_growth", "loss_before_growth")}
                summary[f"{kind}/{budget:g}N"]["bounds"] = sorted({r[k]["bound"] for r in rows
                                                                   for k in ("R_incl", "R_best")} - {"="})
                summary[f"{kind}/{budget:g}N"]["pays_every_seed"] = all(r["R_best"]["value"] > 1 for r in rows)
        families[family] = {"seeds": per_seed, "gate": {"margins": gate_margins, "mean": mean_margin,
                                                         "std": spread, "conclusive": conclusive},
                            "summary": summary}
    pairs = dict(zip(GROWTH_KINDS["tf"], GROWTH_KINDS["t"]))
    families["tf_over_t"] = {
        f"{kind}/{b:g}N vs {pairs[kind]}/{b:g}N":
            families["tf"]["summary"][f"{kind}/{b:g}N"]["R_best"]["mean"]
            / families["t"]["summary"][f"{pairs[kind]}/{b:g}N"]["R_best"]["mean"]
        for kind in GROWTH_KINDS["tf"] for b in p.stage_budgets}
    return families


def _cell(stats: dict[str, float], digits: int = 2) -> str:
    if stats["n"] == 1:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"


def table(p: Protocol, results: dict[str, Any]) -> str:
    lines = []
    for family, label in FAMILIES.items():
        data = results[family]
        gate = data["gate"]
        lines += [f"**{label}** (seeds: {len(data['seeds'])}; gate: the large model at N beats the small frontier "
                  f"at equal compute by {gate['mean']:+.4f} nats, seed std {gate['std']:.4f}: "
                  f"{'conclusive' if gate['conclusive'] else 'INCONCLUSIVE'})", "",
                  "| arm | final loss | R_incl | R_excl | R_best | pays (every seed) | loss before -> after -> peak |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, row in data["summary"].items():
            bound = f" (bounds: {', '.join(row['bounds'])})" if row["bounds"] else ""
            lines.append(f"| {name} | {_cell(row['final_val_loss'], 4)} | {_cell(row['R_incl'])}{bound} | "
                         f"{_cell(row['R_excl'])} | {_cell(row['R_best'])} | "
                         f"{'yes' if row['pays_every_seed'] else 'no'} | "
                         f"{row['loss_before_growth']['mean']:.4f} -> {row['loss_right_after_growth']['mean']:.4f} "
                         f"-> {row['loss_peak_after_growth']['mean']:.4f} |")
        lines.append("")
    lines.append("TokenFormer R_best / Transformer R_best (mean over seeds): " + "; ".join(
        f"{k}: {v:.2f}" for k, v in results["tf_over_t"].items()))
    return "\n".join(lines) + "\n"


def plot(p: Protocol, all_arms: list[Arm], outcomes: dict[str, dict[str, Any]], path: Path) -> None:
    """Loss vs cumulative training FLOPs: per family the two from-scratch frontiers (mean over seeds)
    and every grown arm's curve, drawn from its base."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, (family, label) in zip(axes, FAMILIES.items()):
        colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
        for kind, style in (("large", dict(color="black", linewidth=2)), ("small", dict(color="grey", linewidth=2))):
            points = defaultdict(list)
            for a in all_arms:
                if a.family == family and a.kind == kind:
                    points[arm_flops(p, a)["cumulative"]].append(outcomes[a.name]["final_val_loss"])
            xs = sorted(points)
            ax.plot(xs, [sum(points[x]) / len(points[x]) for x in xs], "o-", label=f"{kind} from scratch", **style)
        for kind in GROWTH_KINDS[family]:
            colour = next(colours)
            for a in (a for a in all_arms if a.family == family and a.kind == kind):
                flops = arm_flops(p, a)
                per_step = flops["stage"] / a.steps
                curve = outcomes[a.name]["curve"]
                ax.plot([flops["base"] + s * per_step for s, _ in curve], [l for _, l in curve], color=colour,
                        alpha=0.6, linewidth=1, label=kind if a.seed == 0 and a.budget == p.stage_budgets[-1] else None)
                ax.plot([flops["cumulative"]], [curve[-1][1]], "s", color=colour, markersize=4)
        ax.set_xscale("log")
        ax.set_title(f"{label}: growing vs from scratch")
        ax.set_xlabel("cumulative training FLOPs (a grown run counts its base)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("validation loss (nats/byte)")
    lows = [o["final_val_loss"] for o in outcomes.values()]
    axes[0].set_ylim(min(lows) - 0.05, sorted(lows)[len(lows) // 2] + 0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

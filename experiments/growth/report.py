"""From the arms' final losses to the answer: per family and seed the from-scratch frontiers, each
grown arm's compute ratios, the regime gate, the loss jump after growth; then means and ranges
over seeds, a Markdown table, and the plot."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from experiments.growth.protocol import (FAMILIES, Arm, Protocol, arm_flops, compute_to_reach, flops_at, loss_at,
                                         mean_and_range, ratios, std)

GATE_DEVIATIONS = 3


def choose_lr(p: Protocol, outcomes: dict[str, dict[str, Any]], family: str) -> float:
    """The protocol's fixed lr, else the sweep's lr with the lowest final loss for `family` (its
    large model, seed 0)."""
    if p.fixed_lr is not None:
        return p.fixed_lr[list(FAMILIES).index(family)]
    sweep = [o for name, o in outcomes.items() if name.startswith(f"{family}/sweep/")]
    return min(sweep, key=lambda o: o["final_val_loss"])["lr"]


PAIRS = {"grown-exact": "widen-exact", "grown-official": "widen-random", "in-run-carry": "widen-carry"}
SUMMARY_KEYS = ("R_incl", "R_excl", "R_best", "final_val_loss", "loss_right_after_growth", "loss_peak_after_growth",
                "loss_before_growth")


def around_growth(p: Protocol, arm: Arm, curve: list, base_loss: float | None) -> dict[str, float]:
    """The validation loss before the (first) growth, at the first validation after it, and the
    highest after it."""
    if arm.parent:
        return {"loss_before_growth": base_loss, "loss_right_after_growth": curve[0][1],
                "loss_peak_after_growth": max(loss for _, loss in curve)}
    step = p.growth_step(arm.grow_at[0])
    after = [loss for s, loss in curve if s > step]
    return {"loss_before_growth": [loss for s, loss in curve if s <= step][-1], "loss_right_after_growth": after[0],
            "loss_peak_after_growth": max(after)}


def compute_to_target(p: Protocol, arm: Arm, curve: list, target: float) -> float | None:
    """The arm's training compute when its validation loss first reaches `target` (linear in steps
    between validations), or None if it never does."""
    for (s0, l0), (s1, l1) in zip([(None, None), *curve], curve):
        if l1 <= target:
            step = s1 if s0 is None else s0 + (l0 - target) / (l0 - l1) * (s1 - s0)
            return flops_at(p, arm, step)
    return None


def grown_row(p: Protocol, arm: Arm, outcome: dict[str, Any], base_loss: float | None, large: list, small: list,
              target: tuple[float, float]) -> dict[str, Any]:
    """One grown arm of one seed: its ratios, the loss around its growth, and the user's ratio U:
    compute to reach the large model's final from-scratch loss / that model's compute."""
    flops = arm_flops(p, arm)
    r = ratios(outcome["final_val_loss"], flops, large, small)
    reach = compute_to_target(p, arm, outcome["curve"], target[0])
    return {"kind": arm.kind, "label": arm.label, "budget": arm.budget, "final_val_loss": outcome["final_val_loss"],
            "flops": flops, **{k: {"value": v.flops, "bound": v.bound} for k, v in r.items()},
            **around_growth(p, arm, outcome["curve"], base_loss),
            "U": None if reach is None else reach / target[1]}


def seed_results(p: Protocol, all_arms: list[Arm], outcomes: dict[str, dict[str, Any]], family: str,
                 seed: int) -> dict[str, Any]:
    def frontier(kind: str) -> list[tuple[float, float]]:
        return [(arm_flops(p, a)["cumulative"], outcomes[a.name]["final_val_loss"]) for a in all_arms
                if a.family == family and a.kind == kind and a.seed == seed]

    large, small = frontier("large"), frontier("small")
    full_large = max(large)  # the large model at N steps: (compute, loss)
    base = Arm(family, "small", seed, 1.0, p.budget_steps(1.0)).name
    base_loss = outcomes[base]["final_val_loss"] if base in outcomes else None
    grown = {a.name: grown_row(p, a, outcomes[a.name], base_loss, large, small, (full_large[1], full_large[0]))
             for a in all_arms if a.family == family and a.seed == seed and a.grown}
    small_reach = compute_to_reach(small, full_large[1])
    return {"large_frontier": large, "small_frontier": small, "gate_margin": loss_at(small, full_large[0]) - full_large[1],
            "large_final": full_large[1], "U_small": {"value": small_reach.flops / full_large[0],
                                                      "bound": small_reach.bound}, "grown": grown}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and range over seeds of one arm's numbers."""
    out = {key: mean_and_range([r[key]["value"] if isinstance(r[key], dict) else r[key] for r in rows])
           for key in SUMMARY_KEYS}
    out["bounds"] = sorted({r[k]["bound"] for r in rows for k in ("R_incl", "R_best")} - {"="})
    out["pays_every_seed"] = all(r["R_best"]["value"] > 1 for r in rows)
    reached = [r["U"] for r in rows if r["U"] is not None]
    out["U"] = {**(mean_and_range(reached) if reached else {}), "reached": len(reached), "n": len(rows)}
    return out


def analyse(p: Protocol, all_arms: list[Arm], outcomes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    families: dict[str, Any] = {}
    for family in FAMILIES:
        # a seed counts once its ladders are done: the large model at N and a small one past its compute
        seeds = [s for s in (p.tf_seeds if family == "tf" else p.t_seeds)
                 if {(k, b) for a in all_arms if (a.family, a.seed) == (family, s) for k, b in [(a.kind, a.budget)]}
                 >= {("large", max(p.large_budgets)), ("small", max(p.small_budgets))}]
        per_seed = {seed: seed_results(p, all_arms, outcomes, family, seed) for seed in seeds}
        if not per_seed:
            families[family] = {"seeds": {}, "gate": None, "summary": {}}
            continue
        gate_margins = [s["gate_margin"] for s in per_seed.values()]
        spread = std(gate_margins)
        mean_margin = sum(gate_margins) / len(gate_margins)
        conclusive = mean_margin > 0 and (len(gate_margins) < 2 or mean_margin > GATE_DEVIATIONS * spread)
        labels = list(dict.fromkeys(g["label"] for s in per_seed.values() for g in s["grown"].values()))
        summary = {label: summarise([g for s in per_seed.values() for g in s["grown"].values() if g["label"] == label])
                   for label in labels}
        families[family] = {"seeds": per_seed, "gate": {"margins": gate_margins, "mean": mean_margin,
                                                         "std": spread, "conclusive": conclusive},
                            "summary": summary}
    families["tf_over_t"] = {}
    for label, row in families["tf"]["summary"].items():
        kind = label.split("/")[0].split("@")[0]
        twin = label.replace(kind, PAIRS.get(kind, kind), 1)
        if kind in PAIRS and twin in families["t"]["summary"]:
            families["tf_over_t"][f"{label} vs {twin}"] = row["R_best"]["mean"] / \
                families["t"]["summary"][twin]["R_best"]["mean"]
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
        if gate is None:
            lines += [f"**{label}**: no seed with its from-scratch ladders done", ""]
            continue
        lines += [f"**{label}** (seeds: {len(data['seeds'])}; gate: the large model at N beats the small frontier "
                  f"at equal compute by {gate['mean']:+.4f} nats, seed std {gate['std']:.4f}: "
                  f"{'conclusive' if gate['conclusive'] else 'INCONCLUSIVE'})", "",
                  "| arm | final loss | R_incl | R_excl | R_best | pays (every seed) | U | "
                  "loss before -> after -> peak |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines.append(f"| small from scratch | | | | | | {_u_small(data)} | |")
        for name, row in data["summary"].items():
            bound = f" (bounds: {', '.join(row['bounds'])})" if row["bounds"] else ""
            lines.append(f"| {name} | {_cell(row['final_val_loss'], 4)} | {_cell(row['R_incl'])}{bound} | "
                         f"{_cell(row['R_excl'])} | {_cell(row['R_best'])} | "
                         f"{'yes' if row['pays_every_seed'] else 'no'}{_seeds(row)} | {_u(row['U'])} | "
                         f"{row['loss_before_growth']['mean']:.4f} -> {row['loss_right_after_growth']['mean']:.4f} "
                         f"-> {row['loss_peak_after_growth']['mean']:.4f} |")
        lines.append("")
    lines.append("U: compute to reach the large model's final from-scratch loss (its N-step run) / that run's "
                 "compute, read on the arm's validation curve; n/m: reached on n of m seeds.")
    lines.append("TokenFormer R_best / Transformer R_best (mean over seeds): " + "; ".join(
        f"{k}: {v:.2f}" for k, v in results["tf_over_t"].items()))
    return "\n".join(lines) + "\n"


def _seeds(row: dict[str, Any]) -> str:
    n = row["final_val_loss"]["n"]
    return " (1 seed)" if n == 1 else f" ({n} seeds)"


def _u(stats: dict[str, Any]) -> str:
    if not stats["reached"]:
        return f"not reached (0/{stats['n']})"
    return _cell(stats) + ("" if stats["reached"] == stats["n"] else f" ({stats['reached']}/{stats['n']})")


def _u_small(data: dict[str, Any]) -> str:
    values = [s["U_small"] for s in data["seeds"].values()]
    return ", ".join(f"{'' if v['bound'] == '=' else v['bound']}{v['value']:.2f}" for v in values)


def plot(p: Protocol, all_arms: list[Arm], outcomes: dict[str, dict[str, Any]], path: Path) -> None:
    """Loss vs cumulative training FLOPs: per family the two from-scratch frontiers (mean over seeds)
    and every grown arm's curve (a post-hoc one drawn from its base, an in-run one from its start)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, (family, label) in zip(axes, FAMILIES.items()):
        colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
        for kind, style in (("large", dict(color="black", linewidth=2)), ("small", dict(color="grey", linewidth=2))):
            points, per_seed = defaultdict(list), defaultdict(list)
            for a in sorted((a for a in all_arms if a.family == family and a.kind == kind), key=lambda a: a.steps):
                x = arm_flops(p, a)["cumulative"]
                points[x].append(outcomes[a.name]["final_val_loss"])
                per_seed[a.seed].append((x, outcomes[a.name]["final_val_loss"]))
            for seed_points in per_seed.values():  # each seed thin: an outlier seed shows as one
                ax.plot(*zip(*seed_points), "-", color=style["color"], linewidth=0.8, alpha=0.5)
            xs = sorted(points)
            ax.plot(xs, [sum(points[x]) / len(points[x]) for x in xs], "o-", label=f"{kind} from scratch (mean; "
                    f"thin: each seed)", **style)
        grown = [a for a in all_arms if a.family == family and a.grown]
        for kind in dict.fromkeys(a.kind for a in grown):
            colour, labelled = next(colours), False
            for a in (a for a in grown if a.kind == kind):
                curve = outcomes[a.name]["curve"][1 if a.grow_at else 0:]  # an in-run arm's step 0 is off the log axis
                ax.plot([flops_at(p, a, s) for s, _ in curve], [l for _, l in curve], color=colour,
                        alpha=0.6, linewidth=1, label=None if labelled else kind)
                ax.plot([flops_at(p, a, a.steps)], [curve[-1][1]], "s", color=colour, markersize=4)
                labelled = True
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))  # labels that do not overlap
        ax.xaxis.set_major_formatter(matplotlib.ticker.LogFormatterSciNotation(labelOnlyBase=False))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
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

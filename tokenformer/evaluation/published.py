"""The published zero-shot results of TokenFormer and Pythia (spec section 6), and the table that
sets a run's lm-eval scores beside those of the nearest published sizes."""

from __future__ import annotations

import math

# The official zero-shot list (spec section 6), in the order of the published table.
OFFICIAL_TASKS = ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")

# Which lm-eval metric each published column is: accuracy, except length-normalised accuracy
# for HellaSwag and ARC-Challenge (the convention of the TokenFormer and Mamba tables).
TABLE_METRICS = {"lambada_openai": "acc", "hellaswag": "acc_norm", "piqa": "acc",
                 "arc_easy": "acc", "arc_challenge": "acc_norm", "winogrande": "acc"}

# Published zero-shot results (spec section 6), in percent; LAMBADA perplexity as `lambada_ppl`.
# Parameter counts: TokenFormer exact (spec section 2), Pythia nominal.
PUBLISHED = {
    "Pythia-160M": dict(parameters=160e6, pile_ppl=29.64, lambada_ppl=37.25, lambada_openai=35.4,
                        hellaswag=30.3, piqa=62.3, arc_easy=43.6, arc_challenge=23.6, winogrande=51.3, avg=40.1),
    "TokenFormer-150M": dict(parameters=151_881_216, pile_ppl=10.45, lambada_ppl=16.38, lambada_openai=45.0,
                             hellaswag=35.5, piqa=64.9, arc_easy=47.3, arc_challenge=24.9, winogrande=50.4, avg=44.7),
    "Pythia-410M": dict(parameters=410e6, pile_ppl=9.95, lambada_ppl=10.84, lambada_openai=51.4,
                        hellaswag=40.6, piqa=66.9, arc_easy=52.1, arc_challenge=24.6, winogrande=53.8, avg=48.2),
    "TokenFormer-450M": dict(parameters=454_166_528, pile_ppl=8.28, lambada_ppl=7.69, lambada_openai=57.3,
                             hellaswag=47.5, piqa=69.5, arc_easy=56.2, arc_challenge=26.7, winogrande=54.6, avg=52.0),
    "Pythia-1B": dict(parameters=1.0e9, pile_ppl=7.82, lambada_ppl=7.92, lambada_openai=56.1,
                      hellaswag=47.2, piqa=70.7, arc_easy=57.0, arc_challenge=27.1, winogrande=53.5, avg=51.9),
    "TokenFormer-900M": dict(parameters=903_252_480, pile_ppl=7.38, lambada_ppl=5.46, lambada_openai=64.0,
                             hellaswag=55.3, piqa=72.4, arc_easy=59.9, arc_challenge=30.6, winogrande=56.4, avg=56.4),
    "TokenFormer-1.5B": dict(parameters=1_587_219_456, pile_ppl=6.91, lambada_ppl=5.24, lambada_openai=64.7,
                             hellaswag=60.0, piqa=74.8, arc_easy=64.8, arc_challenge=32.0, winogrande=59.7, avg=59.3),
}


def nearest_published(parameters: int) -> tuple[str, str]:
    """The published TokenFormer and Pythia models closest in size (by ratio of parameter counts)."""
    def closest(family: str) -> str:
        names = [n for n in PUBLISHED if n.startswith(family)]
        return min(names, key=lambda n: abs(math.log(PUBLISHED[n]["parameters"] / parameters)))

    return closest("TokenFormer"), closest("Pythia")


def task_scores(results: dict) -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}` from lm-eval's `results["results"]` (the `,none` filter only)."""
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if filter_name == "none" and isinstance(value, (int, float)) and not metric.endswith("_stderr"):
                scores.setdefault(task, {})[metric] = float(value)
    return scores


def comparison_table(scores: dict[str, dict[str, float]], parameters: int) -> str:
    """A Markdown table: our metric per task beside the published numbers of the nearest sizes."""
    ours_tf, ours_pythia = nearest_published(parameters)
    header = (f"| task | metric | ours ({_human(parameters)} params) | {ours_tf} | {ours_pythia} |\n"
              f"| --- | --- | --- | --- | --- |\n")
    rows, accuracies = [], []
    tasks = [t for t in OFFICIAL_TASKS if t in scores] + sorted(t for t in scores if t not in OFFICIAL_TASKS)
    for task in tasks:
        metrics = scores[task]
        if task == "lambada_openai" and "perplexity" in metrics:
            rows.append(f"| {task} | perplexity | {metrics['perplexity']:.2f} | "
                        f"{PUBLISHED[ours_tf]['lambada_ppl']:.2f} | {PUBLISHED[ours_pythia]['lambada_ppl']:.2f} |")
        metric = TABLE_METRICS.get(task) or ("acc" if "acc" in metrics else next(iter(metrics), None))
        if metric is None or metric not in metrics:
            continue
        value = 100 * metrics[metric] if metric.startswith("acc") else metrics[metric]
        if task in TABLE_METRICS:
            accuracies.append(value)
        rows.append(f"| {task} | {metric} | {value:.1f} | {_published(ours_tf, task)} | {_published(ours_pythia, task)} |")
        if len(accuracies) == len(OFFICIAL_TASKS) and task == OFFICIAL_TASKS[-1]:
            rows.append(f"| average | acc | {sum(accuracies) / len(accuracies):.1f} | "
                        f"{PUBLISHED[ours_tf]['avg']:.1f} | {PUBLISHED[ours_pythia]['avg']:.1f} |")
    return header + "\n".join(rows) + "\n"


def _published(model: str, task: str) -> str:
    value = PUBLISHED[model].get(task)
    return "-" if value is None else f"{value:.1f}"


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)

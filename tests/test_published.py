"""The published zero-shot numbers and the table that sets our lm-eval scores beside them (no lm-eval
needed: the scores are written here in the shape lm-eval returns them)."""

from tokenformer.evaluation.published import comparison_table, nearest_published, task_scores


def test_nearest_published_sizes_by_parameter_count():
    assert nearest_published(90_000) == ("TokenFormer-150M", "Pythia-160M")
    assert nearest_published(400_000_000) == ("TokenFormer-450M", "Pythia-410M")
    assert nearest_published(1_000_000_000) == ("TokenFormer-900M", "Pythia-1B")
    assert nearest_published(2_000_000_000) == ("TokenFormer-1.5B", "Pythia-1B")


def test_task_scores_keep_the_unfiltered_metrics_without_their_stderr():
    # lm-eval's results["results"]: "metric,filter" keys, an alias, stderr entries (a number or "N/A")
    results = {"lambada_openai": {"alias": "lambada_openai", "perplexity,none": 16.0, "perplexity_stderr,none": 0.6,
                                  "acc,none": 0.45, "acc_stderr,none": 0.007},
               "hellaswag": {"alias": "hellaswag", "acc,none": 0.3, "acc_norm,none": 0.355,
                             "acc_norm_stderr,none": "N/A", "acc,strict-match": 0.9},
               "gsm8k": {"alias": "gsm8k", "exact_match,flexible-extract": 0.1}}
    assert task_scores(results) == {"lambada_openai": {"perplexity": 16.0, "acc": 0.45},
                                    "hellaswag": {"acc": 0.3, "acc_norm": 0.355}}


def test_comparison_table_puts_our_scores_beside_the_published_ones():
    scores = {"lambada_openai": {"acc": 0.45, "perplexity": 16.0}, "hellaswag": {"acc": 0.3, "acc_norm": 0.355},
              "piqa": {"acc": 0.649}, "arc_easy": {"acc": 0.473}, "arc_challenge": {"acc": 0.2, "acc_norm": 0.249},
              "winogrande": {"acc": 0.504}, "mine": {"acc": 0.5}}
    table = comparison_table(scores, 151_881_216)
    lines = table.strip().splitlines()
    assert lines[0] == "| task | metric | ours (152M params) | TokenFormer-150M | Pythia-160M |"
    assert "| lambada_openai | perplexity | 16.00 | 16.38 | 37.25 |" in lines
    assert "| hellaswag | acc_norm | 35.5 | 35.5 | 30.3 |" in lines
    assert "| arc_challenge | acc_norm | 24.9 | 24.9 | 23.6 |" in lines
    assert lines[-2] == "| average | acc | 44.7 | 44.7 | 40.1 |"  # the published average is reproduced
    assert lines[-1] == "| mine | acc | 50.0 | - | - |"

"""Evaluation: scoring windows and the mean next-token loss, perplexity, the published numbers,
and lm-evaluation-harness."""

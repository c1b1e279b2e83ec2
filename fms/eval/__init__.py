"""Accuracy evaluation library: log-likelihood scoring, multiple-choice tasks and data, summarization, lm-eval."""

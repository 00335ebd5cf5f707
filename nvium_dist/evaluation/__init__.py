"""Evaluation with lm-evaluation-harness: the `nvium` model type (lm_eval_model) and the site hook that
registers it for the `lm_eval` command (lm_eval_hook)."""

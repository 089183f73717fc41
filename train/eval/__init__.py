"""Evaluation: the evaluate command, lm-eval's model class, HumanEval and its sandbox."""

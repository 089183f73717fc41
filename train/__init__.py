"""Training: the shared loop and its stages; data in train/data, evaluation in train/eval.

`import model` first: it caps OpenMP's spinning before anything here imports torch.
"""
import model  # noqa: F401

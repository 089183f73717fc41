"""File formats and I/O: checkpoints, quantized runs, transformers interop, atomic writes."""

"""Training: tokenizer, data pipeline, SFT/DPO tasks, the shared loop and the entry points."""

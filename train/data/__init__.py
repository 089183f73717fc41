"""Data: corpus preparation (sources, filters, BPE shards), SFT/DPO examples, the built-in tasks."""

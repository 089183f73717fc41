"""Pretraining: `python -m train.pretrain` trains a GPT on a token corpus, offline, with no arguments.

With no flags it prepares the built-in corpus (the Python standard library's sources) if needed,
picks the tiny preset on CPU (about 10 minutes on 2 cores) or the small preset on CUDA, and trains
with next-token cross-entropy through the shared loop in train/loop.py.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from model import GPT, ModelConfig
from model.config import PRESETS
from model.generate import generate
from train.data import PreparedData, eval_batches, prepare, sample_batch
from train.launch import run
from train.loop import TrainConfig, add_args, config_from
from train.runtime import Runtime

# Defaults per device: what a zero-argument run does.
CPU_DEFAULTS = TrainConfig(batch_size=16, max_steps=1200, max_minutes=12.0, lr=2e-3, min_lr=2e-4, warmup_steps=30,
                           eval_interval=100, eval_tokens=32768, ckpt_interval=400)
CUDA_DEFAULTS = TrainConfig(batch_size=32, grad_accum=2, max_steps=5000, lr=6e-4, min_lr=6e-5, warmup_steps=200,
                            eval_interval=250, eval_tokens=262144, ckpt_interval=1000)
MODEL_FLAGS = ("n_layer", "n_head", "n_kv_head", "n_embd", "mlp_hidden", "block_size", "rope_theta")


class PretrainJob:
    """Next-token prediction on windows sampled from the training tokens."""
    name = "pretrain"

    def __init__(self, data: PreparedData, cfg: TrainConfig, block_size: int, rt: Runtime, prompt: str):
        self.data, self.cfg, self.block_size, self.rt, self.prompt = data, cfg, block_size, rt, prompt

    def batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        # Sample the global batch and keep this rank's rows, so the data (and the losses) do not
        # depend on how many processes share it.
        B = self.cfg.batch_size
        x, y = sample_batch(self.data.train, B * self.rt.world_size, self.block_size, self.cfg.seed,
                            step * self.cfg.grad_accum + micro)
        rows = slice(self.rt.rank * B, (self.rt.rank + 1) * B)
        return {"x": x[rows].to(self.rt.device, non_blocking=True), "y": y[rows].to(self.rt.device, non_blocking=True)}

    def loss(self, model, batch):
        return model(batch["x"], targets=batch["y"]), {}

    def tokens(self, batch) -> int:
        return batch["x"].numel()

    def evaluate(self, model: GPT) -> dict[str, float]:
        total, count = torch.zeros((), device=self.rt.device), 0
        for x, y in eval_batches(self.data.val, self.cfg.batch_size, self.block_size, self.cfg.eval_tokens):
            total += model(x.to(self.rt.device), targets=y.to(self.rt.device)).float()
            count += 1
        val_loss = total.item() / max(count, 1)
        return {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 50.0))}

    def sample(self, model: GPT) -> str:
        tok = self.data.tokenizer
        prompt = torch.tensor([tok.encode(self.prompt) or [tok.eot_id]], device=self.rt.device)
        out = generate(model, prompt, max_new_tokens=96, temperature=0.8, top_k=50, seed=self.cfg.seed,
                       stop_tokens=[tok.eot_id])
        return tok.decode(out[0].tolist())


def build_parser(device: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.pretrain", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    on_cuda = device == "cuda"
    parser.add_argument("--preset", default="small" if on_cuda else "tiny", choices=list(PRESETS),
                        help="model size preset (tiny: CPU; small: GPT-2-small class; medium)")
    parser.add_argument("--data", default="stdlib",
                        help="corpus: stdlib (built in, offline), a directory/file/glob of text, "
                             "hf:NAME[:split], or a directory made by python -m train.data")
    parser.add_argument("--vocab-size", type=int, default=16384 if on_cuda else 4096,
                        help="BPE vocabulary size when the data still has to be prepared")
    parser.add_argument("--sample-prompt", default="def ", help="prompt of the samples written at each evaluation")
    model_group = parser.add_argument_group("model overrides (default: the preset's values)")
    for name in MODEL_FLAGS:
        kind = float if name == "rope_theta" else int
        model_group.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=f"override {name}")
    add_args(parser, CUDA_DEFAULTS if on_cuda else CPU_DEFAULTS)
    return parser


def load_data(source: str, vocab_size: int, rt: Runtime) -> PreparedData:
    """The prepared dataset for source: rank 0 prepares it (or reuses it), the others wait."""
    if rt.is_main:
        path = prepare(source, vocab_size=vocab_size)
    rt.barrier()
    if not rt.is_main:
        path = prepare(source, vocab_size=vocab_size)   # now a reuse: nothing is rebuilt
    return PreparedData(path)


def build(args: argparse.Namespace, rt: Runtime) -> tuple[PretrainJob, GPT]:
    data = load_data(args.data, args.vocab_size, rt)
    overrides = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    cfg = ModelConfig.preset(args.preset, vocab_size=data.tokenizer.n_vocab, **overrides)
    model = GPT(cfg).to(rt.device)
    if rt.is_main:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        data.tokenizer.save(Path(args.out) / "tokenizer.json")
        print(f"data: {data.manifest['args']['source']}  train {len(data.train):,} tokens  val {len(data.val):,} tokens")
    return PretrainJob(data, config_from(args), cfg.block_size, rt, args.sample_prompt), model


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    device_probe = argparse.ArgumentParser(add_help=False)
    device_probe.add_argument("--device", default="auto")
    device = device_probe.parse_known_args(argv)[0].device
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return run("pretrain", build_parser("cuda" if on_cuda else "cpu"), build, argv)


if __name__ == "__main__":
    main()

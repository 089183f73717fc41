"""Pretraining: `python -m train.pretrain` trains a GPT on a token corpus, offline, with no arguments.

With no flags it prepares the built-in corpus (the Python standard library's sources) if needed,
picks the tiny preset on CPU (Muon, train/optim.py; at most 2,000 steps, as many as fit in 12
minutes: --max-minutes) or the small preset on CUDA (AdamW; 700 steps of 32 x 1024 tokens, about 3
passes over the built-in corpus's 7.5M tokens at vocabulary 16384), and trains with next-token
cross-entropy through the shared loop in train/loop.py. Windows are cut from the token stream regardless of document boundaries; with
--document-mask each token attends only to its own document's tokens.

A run goes over its training tokens at most --max-epochs (4) times: a length from the defaults is
shortened to that (one line says so), an explicit --max-steps / --max-tokens beyond it is refused
unless --max-epochs allows it. The built-in corpus is small for a GPU: there, pass a real corpus,
--data PATH (a directory, file or glob of text) or --data hf:NAME[:split] (streamed whole, so one
of a size you mean to prepare, e.g. hf:roneneldan/TinyStories), a --preset (small, or medium on a
large GPU), and --max-steps so that steps x --batch-size x --grad-accum x block_size (1024) tokens
stay within --max-epochs (up to about 20 per parameter is compute-optimal; the opening lines print
the counts), e.g.
    python -m train.pretrain --data hf:roneneldan/TinyStories --preset small --max-steps 20000
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from model import GPT, ModelConfig
from model.io.checkpoint import load_model, load_tokenizer
from model.command import run_command
from model.config import PRESETS
from model.documents import Documents
from model.generate import generate
from model.tokenizer import Tokenizer
from train.config import TrainConfig, absolute_path, at_least, greater_than, option, positive
from train.data.prepare import MIN_VOCAB, PreparedData, non_empty, prepare
from train.data.sft_data import to_device
from train.data.windows import eval_batches, sample_batch
from train.launch import Stage, run
from train.schedule import total_steps
from train.runtime import Runtime

MODEL_OVERRIDES = "model overrides (default: the preset's values)"


@dataclass
class PretrainConfig(TrainConfig):
    preset: str = option("tiny", "model size preset (tiny: CPU; small: GPT-2-small class; medium)",
                         choices=tuple(PRESETS))
    data: str = option("stdlib", "corpus: stdlib (built in, offline), a directory/file/glob of text, "
                                 "hf:NAME[:split], or a directory made by python -m train.data")
    data_dir: str = option("data", "where prepared datasets are kept: --data is prepared once into "
                                   "DATA_DIR/<name>-v<vocab size>-<hash of the resolved source and the arguments> "
                                   "and found there again (recorded as an absolute path, so post-training finds "
                                   "it from any directory)", non_empty)
    vocab_size: int = option(4096, "BPE vocabulary size when the data still has to be prepared "
                                   f"(at least {MIN_VOCAB})", at_least(MIN_VOCAB))
    init: str = option("", "continue pretraining from this run directory or checkpoint (its weights and "
                           "tokenizer, e.g. one made by python -m model.hf import): --data is tokenized with "
                           "its tokenizer and the model keeps its config (no preset or model overrides)",
                       type=absolute_path)
    sample_prompt: str = option("def ", "prompt of the samples written at each evaluation")
    eval_tokens: int = option(65536, "validation tokens per evaluation", positive)
    max_epochs: float = option(4.0, "the most times the run may go over the training tokens: a run length "
                                    "from the defaults (or --max-minutes) is shortened to it, an explicit "
                                    "--max-steps / --max-tokens beyond it is refused (raise it to allow that)",
                               greater_than(0))
    document_mask: bool = option(False, "attend only within each document of a window (documents start at "
                                        "<|endoftext|>; each from RoPE position 0), in training and validation, "
                                        "instead of across the whole window")
    n_layer: int | None = option(None, "override n_layer", positive, int, group=MODEL_OVERRIDES)
    n_head: int | None = option(None, "override n_head", positive, int, group=MODEL_OVERRIDES)
    n_kv_head: int | None = option(None, "override n_kv_head", positive, int, group=MODEL_OVERRIDES)
    n_embd: int | None = option(None, "override n_embd", positive, int, group=MODEL_OVERRIDES)
    mlp_hidden: int | None = option(None, "override mlp_hidden", positive, int, group=MODEL_OVERRIDES)
    block_size: int | None = option(None, "override block_size", positive, int, group=MODEL_OVERRIDES)
    rope_theta: float | None = option(None, "override rope_theta", greater_than(0), float, group=MODEL_OVERRIDES)
    attn_window: int | None = option(None, "sliding-window attention: each token sees itself and the ATTN_WINDOW - 1 "
                                           "tokens before it (None: the whole context)", positive, int,
                                     group=MODEL_OVERRIDES)
    attn_softcap: float | None = option(None, "cap attention scores s at ATTN_SOFTCAP * tanh(s / ATTN_SOFTCAP), as "
                                              "Gemma 2 (None: no cap)", greater_than(0), float, group=MODEL_OVERRIDES)

    def model_overrides(self) -> dict:
        """The ModelConfig fields given on the command line."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata["group"] == MODEL_OVERRIDES and getattr(self, f.name) is not None}


# What a zero-argument run does, per device. On the CPU: 12 minutes, as many steps as fit (at most
# 2,000), Muon at 0.02 on the block matrices and AdamW at 2e-2 on the embedding and norms, the recipe
# bench/speedrun.py measures against the one before it (AdamW at 2e-3 for everything, 1,200 steps).
# In 400-step runs on the 2-core dev machine (val loss, one thread each, two at a time): AdamW 2e-3
# 5.223; Muon 0.02 with AdamW 2e-3 5.046, 0.04 5.137; with AdamW 6e-3 4.615, 2e-2 4.583 (to
# min_lr 0 instead: 4.639); Muon 0.01 with AdamW 2e-2 4.601, 0.03 with AdamW 1e-2 4.659.
CPU_DEFAULTS = PretrainConfig(preset="tiny", vocab_size=4096, batch_size=16, max_steps=2000, max_minutes=12.0,
                              optimizer="muon", muon_lr=0.02, lr=2e-2, min_lr=2e-3, warmup_steps=30,
                              eval_interval=100, eval_tokens=32768, ckpt_interval=400)
# On CUDA the built-in corpus (about 7.5M training tokens at vocabulary 16384) sizes the run: 700
# steps of 32 x 1024 tokens are 22.9M tokens, about 3 epochs (--max-epochs caps it where a smaller
# stdlib makes that more than 4). A real corpus needs --data and a longer --max-steps.
CUDA_DEFAULTS = PretrainConfig(preset="small", vocab_size=16384, batch_size=32, grad_accum=1, max_steps=700,
                               lr=6e-4, min_lr=6e-5, warmup_steps=70, eval_interval=100, eval_tokens=262144,
                               ckpt_interval=350)


class PretrainJob:
    """Next-token prediction on windows sampled from the training tokens."""
    name = "pretrain"

    def __init__(self, data: PreparedData, cfg: PretrainConfig, block_size: int, rt: Runtime):
        self.data, self.cfg, self.block_size, self.rt = data, cfg, block_size, rt
        self.tokenizer = data.tokenizer

    def batch(self, step: int, micro: int) -> dict:
        # Sample the global batch and keep this rank's rows, so the data (and the losses) do not
        # depend on how many processes share it.
        B = self.cfg.batch_size
        x, y = sample_batch(self.data.train, B * self.rt.world_size, self.block_size, self.cfg.seed,
                            step * self.cfg.grad_accum + micro)
        rows = slice(self.rt.rank * B, (self.rt.rank + 1) * B)
        return self.on_device(x[rows], y[rows])

    def on_device(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """{"x", "y"} on the device, and with --document-mask their "documents" (found on the host,
        so that the device never waits for a sync)."""
        batch = {"x": x, "y": y}
        if self.cfg.document_mask:
            batch["documents"] = Documents.starting_at(x, self.tokenizer.eot_id)
        return to_device(batch, self.rt.device)

    def loss(self, model, batch):
        return model(batch["x"], targets=batch["y"], documents=batch.get("documents")), {}

    def tokens(self, batch) -> int:
        return batch["x"].numel()

    def validate(self, model: GPT) -> dict[str, float]:
        total, count = torch.zeros((), device=self.rt.device), 0
        for x, y in eval_batches(self.data.val, self.cfg.batch_size, self.block_size, self.cfg.eval_tokens):
            batch = self.on_device(x, y)
            total += model(batch["x"], targets=batch["y"], documents=batch.get("documents")).float()
            count += 1
        val_loss = total.item() / max(count, 1)
        return {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 50.0))}

    def sample(self, model: GPT) -> str:
        tok = self.data.tokenizer
        prompt = torch.tensor([tok.encode(self.cfg.sample_prompt) or [tok.eot_id]], device=self.rt.device)
        out = generate(model, prompt, max_new_tokens=96, temperature=0.8, top_k=50, seed=self.cfg.seed,
                       stop_tokens=[tok.eot_id])
        return tok.decode(out[0].tolist())


def load_data(source: str, vocab_size: int, rt: Runtime, data_dir: str = "data",
              tokenizer: Tokenizer | None = None) -> PreparedData:
    """The prepared dataset for source (kept under data_dir): rank 0 prepares it (or reuses it), the others wait."""
    if rt.is_main:
        path = prepare(source, vocab_size=vocab_size, data_dir=data_dir, tokenizer=tokenizer)
    rt.barrier()
    if not rt.is_main:   # a reuse: nothing is rebuilt
        path = prepare(source, vocab_size=vocab_size, data_dir=data_dir, verbose=False, tokenizer=tokenizer)
    return PreparedData(path)


def build(cfg: PretrainConfig, rt: Runtime) -> tuple[PretrainJob, GPT]:
    cfg.data_dir = absolute_path(cfg.data_dir)     # config.json records it: post-training mixes this corpus in
    if cfg.init:
        if cfg.model_overrides():
            raise SystemExit(f"--init keeps the model of {cfg.init}; drop the model overrides "
                             f"{sorted(cfg.model_overrides())}")
        model, _ = load_model(cfg.init, rt.device, trainable=True)
        data = load_data(cfg.data, cfg.vocab_size, rt, cfg.data_dir, load_tokenizer(cfg.init))
    else:
        data = load_data(cfg.data, cfg.vocab_size, rt, cfg.data_dir)
        model = GPT(ModelConfig.preset(cfg.preset, vocab_size=data.tokenizer.n_vocab, **cfg.model_overrides()))
    for split, tokens in (("train", data.train), ("val", data.val)):
        if len(tokens) < model.cfg.block_size + 1:
            raise SystemExit(f"the {split} split of {data.path} has {len(tokens):,} tokens, fewer than one window "
                             f"of block_size + 1 = {model.cfg.block_size + 1}; use a larger corpus"
                             + ("" if cfg.init else " or a smaller --block-size"))
    if rt.is_main:
        print(f"data: {data.manifest['args']['source']}  train {len(data.train):,} tokens  val {len(data.val):,} tokens")
    size_to_data(cfg, len(data.train), cfg.batch_size * cfg.grad_accum * rt.world_size * model.cfg.block_size, rt)
    return PretrainJob(data, cfg, model.cfg.block_size, rt), model.to(rt.device)


def size_to_data(cfg: PretrainConfig, train_tokens: int, tokens_per_step: int, rt: Runtime) -> None:
    """Keep the run within --max-epochs passes over the training tokens: shorten a length from the
    defaults (in cfg, the config the loop trains with and config.json records), refuse an explicit
    one (--fixed-length) in one line; say how many epochs a run that repeats its data does."""
    steps = total_steps(cfg, tokens_per_step)
    most = max(1, math.floor(cfg.max_epochs * train_tokens / tokens_per_step))
    length = f"--max-tokens {cfg.max_tokens:,}" if cfg.max_tokens else f"--max-steps {cfg.max_steps:,}"
    if steps > most and cfg.fixed_length:
        raise SystemExit(f"{length} ({steps * tokens_per_step:,} tokens) goes over the {train_tokens:,} training "
                         f"tokens {steps * tokens_per_step / train_tokens:.1f} times, more than --max-epochs "
                         f"{cfg.max_epochs:g}: pass --max-epochs {math.ceil(steps * tokens_per_step / train_tokens)} "
                         f"to train that long, or a larger corpus (--data), or at most --max-steps {most:,}")
    if steps > most:
        if rt.is_main:
            print(f"run length: the default {steps:,} steps would go over the {train_tokens:,} training tokens "
                  f"{steps * tokens_per_step / train_tokens:.1f} times; shortened to {most:,} steps, "
                  f"--max-epochs {cfg.max_epochs:g} (give --max-steps and --max-epochs to train longer)")
        cfg.max_steps, cfg.max_tokens, steps = most, 0, most
    if cfg.fitted_steps and not cfg.fixed_length:       # a resumed run whose budget fitted its length
        steps = cfg.fitted_steps
    epochs = steps * tokens_per_step / train_tokens
    if epochs > 1 and rt.is_main:
        to_fit = cfg.max_minutes > 0 and not cfg.fixed_length and not cfg.fitted_steps   # may fit fewer steps
        print(f"epochs: {'at most ' if to_fit else ''}{epochs:.1f} passes over the training tokens "
              f"({steps:,} steps of {tokens_per_step:,} tokens)")


STAGE = Stage("pretrain", __doc__, CPU_DEFAULTS, CUDA_DEFAULTS, build)


def main(argv: list[str] | None = None) -> dict:
    return run(STAGE, argv)


if __name__ == "__main__":
    run_command(main)

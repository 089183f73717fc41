"""Our GPT as Hugging Face transformers' LlamaForCausalLM: the config and weight mapping.

The architectures are the same network: pre-norm RMSNorm blocks, grouped-query attention with
rotary embeddings, a SwiGLU MLP, a final RMSNorm and an LM head tied to the embedding. Only the
names differ, plus one layout: our attention has one fused projection whose output rows are
[q heads..., k heads..., v heads...] (head_dim rows each), which splits into q_proj, k_proj and
v_proj.

RoPE needs no permutation. Our apply_rope rotates the two halves of each head vector,
(x1 cos - x2 sin, x2 cos + x1 sin), with frequency i on dims i and i + head_dim/2; transformers'
apply_rotary_pos_emb computes x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1) and
cos, sin of the frequencies repeated twice, which is the same formula. (The q/k permutation in
transformers' Meta-checkpoint converter exists only for Meta's interleaved-pairs convention.)

Export (`python -m model.hf export RUN_OR_CHECKPOINT OUT_DIR`) writes a directory that
transformers loads with no custom code: config.json, model.safetensors (Hugging Face names, the
tied head stored once), generation_config.json, and the tokenizer as tokenizer.json plus
tokenizer_config.json with the chat template (model/hf_tokenizer.py). The directory is written
next to OUT_DIR under a temporary name and renamed into place, so a failed export leaves nothing.

transformers is the optional `hf` extra, imported inside the functions that need it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import shutil
import tempfile
from pathlib import Path

import torch

from model import hf_tokenizer
from model.chat_format import SPECIALS
from model.checkpoint import load_model, load_tokenizer, resolve
from model.command import DEBUG_HELP, run_command
from model.config import ModelConfig
from model.gpt import GPT

INSTALL_HINT = 'transformers is not installed; install the extra with `pip install -e ".[hf]"`'


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return transformers


def _no_init_weights():
    """transformers' context that skips weight init (transformers.initialization from 5.0,
    transformers.modeling_utils before), or a no-op where neither has it."""
    for where in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return getattr(importlib.import_module(where), "no_init_weights")()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def llama_config(cfg: ModelConfig, **overrides):
    """The transformers.LlamaConfig of the same network as GPT(cfg).

    Token ids (bos, eos, pad) are left unset: they belong to the tokenizer, not to the model, so an
    exporter passes them in overrides, which go to LlamaConfig as they are.
    """
    transformers = _transformers()
    fields = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    # transformers 5 takes RoPE settings as rope_parameters; 4.x as rope_theta (and rope_scaling).
    scaling = cfg.rope_scaling or {"rope_type": "default"}
    if "rope_parameters" in inspect.signature(transformers.LlamaConfig.__init__).parameters:
        fields["rope_parameters"] = {**scaling, "rope_theta": cfg.rope_theta}
    else:
        fields.update(rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling)
    return transformers.LlamaConfig(**{**fields, **overrides})


def llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """model's weights under LlamaForCausalLM's names, for load_state_dict(strict=True).

    The tensors are detached views of model's parameters (no copy; q/k/v_proj are row slices of
    the fused qkv weight). With tied embeddings lm_head.weight is the same tensor as
    model.embed_tokens.weight, as in a tied LlamaForCausalLM's own state_dict; drop it (and clone
    the views) before writing a safetensors file, which refuses shared storage.
    """
    cfg = model.cfg
    q_rows, kv_rows = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    embed = model.embed.weight.detach()
    out = {"model.embed_tokens.weight": embed}
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.detach().split([q_rows, kv_rows, kv_rows], dim=0)
        out.update({
            prefix + "input_layernorm.weight": block.attn_norm.weight.detach(),
            prefix + "self_attn.q_proj.weight": q,
            prefix + "self_attn.k_proj.weight": k,
            prefix + "self_attn.v_proj.weight": v,
            prefix + "self_attn.o_proj.weight": block.attn.out.weight.detach(),
            prefix + "post_attention_layernorm.weight": block.mlp_norm.weight.detach(),
            prefix + "mlp.gate_proj.weight": block.mlp.gate.weight.detach(),
            prefix + "mlp.up_proj.weight": block.mlp.up.weight.detach(),
            prefix + "mlp.down_proj.weight": block.mlp.out.weight.detach(),
        })
    out["model.norm.weight"] = model.norm.weight.detach()
    out["lm_head.weight"] = model.head_weight.detach()
    return out


def llama_model(model: GPT, attn_implementation: str = "sdpa"):
    """A transformers.LlamaForCausalLM holding a copy of model's weights, on model's device and
    dtype, in eval mode (call .train() to train it)."""
    transformers = _transformers()
    weight = model.embed.weight
    with _no_init_weights():    # every weight is overwritten below: skip the random init (seconds)
        llama = transformers.LlamaForCausalLM(llama_config(model.cfg, attn_implementation=attn_implementation))
    if model.cfg.tie_embeddings:
        llama.tie_weights()     # post_init ties lm_head to the embedding inside the init just skipped
        if llama.lm_head.weight is not llama.model.embed_tokens.weight:
            raise RuntimeError("transformers did not tie lm_head.weight to model.embed_tokens.weight")
    llama.to(device=weight.device, dtype=weight.dtype)
    llama.load_state_dict(llama_state_dict(model), strict=True)
    return llama.eval()


def export(path: str | Path, out_dir: str | Path) -> Path:
    """Write the checkpoint at path (a run directory: its latest checkpoint) as a transformers
    Llama directory at out_dir, which must not exist or be empty. Returns out_dir."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty directory; choose a new OUT_DIR "
                         f"or remove it first")
    ckpt = resolve(path)
    model, _ = load_model(ckpt)
    tok = load_tokenizer(ckpt)
    missing = [s for s in SPECIALS if s not in tok.special_tokens]
    if missing:
        raise ValueError(f"the tokenizer of {ckpt} lacks the chat tokens {missing}; transformers needs them "
                         f"for the bos, eos and pad ids")
    bos, _, _, end = (tok.special_tokens[s] for s in SPECIALS)
    ids = dict(bos_token_id=bos, eos_token_id=[end, bos], pad_token_id=bos)
    llama = llama_model(model, attn_implementation="sdpa")
    for config in (llama.config, llama.generation_config):
        for name, value in ids.items():
            setattr(config, name, value)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        llama.save_pretrained(staging, safe_serialization=True)
        (staging / "tokenizer.json").write_text(json.dumps(hf_tokenizer.tokenizer_json(tok), ensure_ascii=False),
                                                encoding="utf-8")
        (staging / "tokenizer_config.json").write_text(
            json.dumps(hf_tokenizer.tokenizer_config(tok, model.cfg.block_size), indent=2), encoding="utf-8")
        staging.chmod(0o755)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model.hf", description="Hugging Face interop: export a "
                                     "checkpoint as a transformers Llama directory.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    exp = commands.add_parser("export", help="write a run or checkpoint as a transformers LlamaForCausalLM directory")
    exp.add_argument("path", help="run directory (its latest checkpoint) or checkpoint directory")
    exp.add_argument("out_dir", help="directory to create (must not exist, or be empty)")
    exp.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        _transformers()
    except ImportError as e:
        raise SystemExit(str(e)) from None
    out = export(args.path, args.out_dir)
    print(f"exported {resolve(args.path)} to {out} (load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")


if __name__ == "__main__":
    run_command(main)

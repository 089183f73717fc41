"""Our GPT as Hugging Face transformers' LlamaForCausalLM: the config and weight mapping.

The architectures are the same network: pre-norm RMSNorm blocks, grouped-query attention with
rotary embeddings, a SwiGLU MLP, a final RMSNorm and an LM head tied to the embedding. Only the
names differ, plus one layout: our attention has one fused projection whose output rows are
[q heads..., k heads..., v heads...] (head_dim rows each), which splits into q_proj, k_proj and
v_proj.

RoPE needs no permutation. Our kernels.rotary rotates the two halves of each head vector,
(x1 cos - x2 sin, x2 cos + x1 sin), with frequency i on dims i and i + head_dim/2; transformers'
apply_rotary_pos_emb computes x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1) and
cos, sin of the frequencies repeated twice, which is the same formula. (The q/k permutation in
transformers' Meta-checkpoint converter exists only for Meta's interleaved-pairs convention.)

Export (`python -m model.hf export RUN_OR_CHECKPOINT OUT_DIR`) writes a directory that
transformers loads with no custom code: config.json, model.safetensors (Hugging Face names, the
tied head stored once), generation_config.json, and the tokenizer as tokenizer.json plus
tokenizer_config.json with the chat template (model/io/hf_tokenizer.py). The directory is written
next to OUT_DIR under a temporary name and renamed into place, so a failed export leaves nothing.

Import (`python -m model.hf import HF_DIR OUT_RUN`) is the way back, for any local Llama
directory (config.json, one or sharded safetensors, tokenizer.json), and needs no transformers:
it maps the config (refusing biases, other activations or architectures, RoPE scalings other
than Llama 3's), reorders the vocabulary to our ids (model/io/hf_tokenizer.py), adds our chat
tokens when the tokenizer lacks them (their embedding rows start at the mean row), and writes a
run directory that training's --init and python -m model.chat read.

transformers is the optional `hf` extra, imported inside the functions that need it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
from pathlib import Path

import torch

from model.io import hf_tokenizer
from model.chat_format import SPECIALS
from model.io.checkpoint import load_model, load_tokenizer, made_from, quantized_as, resolve, write_derived
from model.command import DEBUG_HELP, Parser, at_least, flag_type, run_command
from model.config import LLAMA3_KEYS, ModelConfig
from model.io.files import atomic_write_dir, check_new_dir
from model.gpt import GPT
from model.tokenizer import Tokenizer

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
    for name in ("attn_window", "attn_softcap"):
        if getattr(cfg, name):
            raise ValueError(f"this model has {name}={getattr(cfg, name)}, which transformers' Llama does not "
                             f"have: its logits would differ; export a model trained without {name}")
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
    check_new_dir(out_dir, "OUT_DIR")
    ckpt = resolve(path)
    model, state = load_model(ckpt)
    if quantized_as(state):
        raise ValueError(f"{ckpt} is quantized ({quantized_as(state)}); transformers' Llama holds "
                         f"full-precision weights: export the run it was quantized from ({made_from(state)})")
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

    def fill(staging: Path) -> None:
        llama.save_pretrained(staging, safe_serialization=True)
        (staging / "tokenizer.json").write_text(json.dumps(hf_tokenizer.tokenizer_json(tok), ensure_ascii=False),
                                                encoding="utf-8")
        (staging / "tokenizer_config.json").write_text(
            json.dumps(hf_tokenizer.tokenizer_config(tok, model.cfg.block_size), indent=2), encoding="utf-8")

    return atomic_write_dir(out_dir, fill, "OUT_DIR")


DEFAULT_IMPORT_BLOCK = 4096     # longest context of an import unless --block-size says otherwise


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} is missing; a Llama checkpoint directory holds config.json, "
                         f"model.safetensors (or an index of shards) and tokenizer.json") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def config_of_llama(hf: dict, where: str, block_size: int | None) -> ModelConfig:
    """Our ModelConfig of a transformers LlamaConfig dict, or ValueError naming the field we cannot represent."""
    if "LlamaForCausalLM" not in (hf.get("architectures") or []) and hf.get("model_type") != "llama":
        raise ValueError(f"{where}: architectures {hf.get('architectures')} / model_type {hf.get('model_type')!r} "
                         f"is not LlamaForCausalLM")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise ValueError(f"{where}: {field} is true; our model has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r}; ours is SwiGLU (silu)")
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim") not in (None, width // heads):
        raise ValueError(f"{where}: head_dim {hf['head_dim']} is not hidden_size / num_attention_heads "
                         f"({width // heads})")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"{where}: rope scaling {kind!r} is not supported (only Llama 3's 'llama3' is)")
    positions = hf.get("max_position_embeddings", 2048)
    return ModelConfig(
        vocab_size=hf["vocab_size"], block_size=min(positions, block_size or DEFAULT_IMPORT_BLOCK),
        n_layer=hf["num_hidden_layers"], n_head=heads, n_kv_head=hf.get("num_key_value_heads") or heads,
        n_embd=width, mlp_hidden=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_scaling={k: rope[k] for k in LLAMA3_KEYS} if kind == "llama3" else None)


def _read_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    index = hf_dir / "model.safetensors.index.json"
    files = sorted(set(_read_json(index)["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(str(hf_dir / name)))
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{hf_dir / name}: unreadable safetensors file ({e})") from None
    return tensors


def _our_state(tensors: dict[str, torch.Tensor], cfg: ModelConfig, where: Path) -> dict[str, torch.Tensor]:
    """Our state dict (fp32, file vocabulary order) from a Llama checkpoint's tensors (inverse of llama_state_dict)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT(cfg).state_dict().items()}
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        names["head.weight"] = "lm_head.weight"
    parts = {"attn_norm": "input_layernorm", "attn.out": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm",
             "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.out": "mlp.down_proj"}
    for i in range(cfg.n_layer):
        names.update({f"blocks.{i}.{ours}.weight": f"model.layers.{i}.{theirs}.weight" for ours, theirs in parts.items()})
    used = set(names.values()) | {f"model.layers.{i}.self_attn.{x}_proj.weight" for i in range(cfg.n_layer) for x in "qkv"}
    extra = sorted(k for k in tensors if k not in used and not (k == "lm_head.weight" and cfg.tie_embeddings)
                   and "rotary_emb" not in k)
    if extra:
        raise ValueError(f"{where}: tensors our model cannot hold: {extra[:4]} (biases or another architecture)")
    missing = sorted(k for k in used if k not in tensors)
    if missing:
        raise ValueError(f"{where}: missing tensors {missing[:4]}")
    state = {ours: tensors[theirs] for ours, theirs in names.items()}
    for i in range(cfg.n_layer):
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [tensors[f"model.layers.{i}.self_attn.{x}_proj.weight"] for x in "qkv"])
    for name, shape in shapes.items():
        if state[name].shape != shape:
            raise ValueError(f"{where}: {names.get(name, name)} has shape {tuple(state[name].shape)}, but "
                             f"config.json implies {tuple(shape)}")
    return {k: v.float() for k, v in state.items()}


def _reorder_vocab(state: dict, cfg: ModelConfig, tok: Tokenizer, mapping: dict[int, int]) -> tuple[dict, ModelConfig, Tokenizer]:
    """Embedding (and head) rows in our id order; our chat tokens added when missing; rows past the
    tokenizer (padding) kept after it."""
    added = [s for s in SPECIALS if s not in tok.special_tokens]
    n_tok = tok.n_vocab
    if added:
        specials = {**tok.special_tokens, **{s: n_tok + j for j, s in enumerate(added)}}
        tok = Tokenizer(tok.merges, specials, tok.pattern)
    spare = [i for i in range(cfg.vocab_size) if i not in mapping]
    order = [0] * (n_tok + len(added) + len(spare))                   # our row -> file row (-1: new)
    for theirs, ours in mapping.items():
        if theirs >= cfg.vocab_size:
            raise ValueError(f"tokenizer id {theirs} is past the model's vocab_size {cfg.vocab_size}")
        order[ours] = theirs
    order[n_tok:n_tok + len(added)] = [-1] * len(added)
    order[n_tok + len(added):] = spare
    for key in ("embed.weight", "head.weight"):
        if key in state:
            rows = state[key]
            new = torch.cat([rows, rows.mean(0, keepdim=True)])       # row -1: the mean row
            state[key] = new[torch.tensor(order)]
    return state, ModelConfig.from_dict({**cfg.to_dict(), "vocab_size": len(order)}), tok


def import_llama(hf_dir: str | Path, out_run: str | Path, block_size: int | None = None) -> Path:
    """Write the Llama checkpoint directory hf_dir as a run directory out_run (must not exist or be empty)."""
    hf_dir = Path(hf_dir)
    check_new_dir(out_run, "OUT_RUN")
    if not hf_dir.is_dir():
        raise ValueError(f"{hf_dir} is not a directory; pass a local Llama checkpoint directory (nothing is downloaded)")
    if (hf_dir / "checkpoints" / "latest").exists() or (hf_dir / "state.json").exists():
        raise ValueError(f"{hf_dir} is a tritongpt run, not a Hugging Face directory: it needs no import; give it "
                         f"as it is to --init, python -m model.chat or python -m model.serve")
    cfg = config_of_llama(_read_json(hf_dir / "config.json"), str(hf_dir / "config.json"), block_size)
    tok, mapping = hf_tokenizer.from_tokenizer_json(_read_json(hf_dir / "tokenizer.json"), str(hf_dir / "tokenizer.json"))
    state = _our_state(_read_tensors(hf_dir), cfg, hf_dir)
    state, cfg, tok = _reorder_vocab(state, cfg, tok, mapping)
    with torch.device("meta"):                               # no memory for weights that are replaced
        model = GPT(cfg)
    model.load_state_dict(state, assign=True)                # the state is exactly our model's (strict)
    return atomic_write_dir(out_run, lambda staging: write_derived(staging, model, tok, "import", hf_dir), "OUT_RUN")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m model.hf", description="Hugging Face interop: export a "
                                     "checkpoint as a transformers Llama directory, or import one as a run.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    exp = commands.add_parser("export", help="write a run or checkpoint as a transformers LlamaForCausalLM directory")
    exp.add_argument("path", help="run directory (its latest checkpoint) or checkpoint directory")
    exp.add_argument("out_dir", help="directory to create (must not exist, or be empty)")
    exp.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    imp = commands.add_parser("import", help="read a local Llama checkpoint directory into a run directory")
    imp.add_argument("hf_dir", help="directory with config.json, model.safetensors (or shards) and tokenizer.json")
    imp.add_argument("out_run", help="run directory to create (must not exist, or be empty)")
    imp.add_argument("--block-size", type=flag_type(int, at_least(1)), default=None,
                     help=f"longest context (default: the checkpoint's, at most {DEFAULT_IMPORT_BLOCK}; "
                          f"the KV cache is allocated at this length)")
    imp.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "import":
        out = import_llama(args.hf_dir, args.out_run, args.block_size)
        print(f"imported {args.hf_dir} into {out} (fine-tune it with python -m train.sft --init {out})")
        return
    try:
        _transformers()
    except ImportError as e:
        raise SystemExit(str(e)) from None
    out = export(args.path, args.out_dir)
    print(f"exported {resolve(args.path)} to {out} (load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")


if __name__ == "__main__":
    run_command(main)

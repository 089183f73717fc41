"""`apply_tritongpt_kernels(model)`: our kernels inside a transformers Llama-family model.

On a LlamaForCausalLM, and on Mistral, Qwen2 and Qwen3, whose blocks differ from Llama's only in
config (a sliding window, q/k/v biases, Qwen3's per-head q/k norms), it swaps in place, keeping
every parameter (the same tensors under the same names: optimizers, checkpoints, save_pretrained
and peft see no difference):

- every RMSNorm: kernels.rms_norm; in each decoder layer the add of the attention's output to the
  residual stream is fused into the post-attention norm (rms_norm(..., residual=)); the MLP's add
  stays as it is, since the norm after it belongs to the next layer;
- the MLP: kernels.swiglu, with the down projection recomputing the activation in its backward
  (model/gpt.py's _SwiGLUDown) instead of keeping it;
- attention: kernels.attention through transformers' attention registry under the name
  "tritongpt" (importing this module registers it, so `from_pretrained(...,
  attn_implementation="tritongpt")` works too). A padded batch (2-D attention mask) and packed
  sequences run as kernels.varlen_attention over the real tokens only, as FlashAttention's
  integration does, with the same mask function;
- the loss: with labels, kernels.linear_cross_entropy of the final hidden states and lm_head's
  weight, in chunks of rows, so the (tokens, vocabulary) logits never exist; in training the
  output's logits are then None (as with Liger-Kernel), in evaluation they are computed as before.

Each op runs on the backend kernels.use() chose (triton for CUDA tensors, torch otherwise, by
default). Any other architecture is refused with one line naming it. Needs transformers 5.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_outputs import CausalLMOutputWithPast

from tritongpt import kernels
from model.gpt import _SwiGLUDown

ATTENTION = "tritongpt"                          # the attn_implementation name
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
IGNORE_INDEX = -100                              # transformers' label for "no loss here"


def apply_tritongpt_kernels(model: nn.Module) -> nn.Module:
    """Swap our RMSNorm (residual add fused), SwiGLU, attention and fused linear cross-entropy into a
    Llama, Mistral, Qwen2 or Qwen3 causal LM, in place; returns the model. Applying it twice is
    the same as once."""
    architecture = next((cls.__name__ for cls in type(model).__mro__ if cls.__name__ in SUPPORTED), None)
    if architecture is None:
        raise ValueError(f"apply_tritongpt_kernels supports {', '.join(SUPPORTED)}, not {type(model).__name__}; "
                         f"load the model as one of those or leave it unpatched")
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ValueError(f"apply_tritongpt_kernels needs transformers 5 or later, found {transformers.__version__}; "
                         f"pip install -U transformers")
    config = model.config
    if config.hidden_act not in ("silu", "swish"):
        raise ValueError(f"{architecture} has hidden_act={config.hidden_act!r}; our SwiGLU is silu's: leave it unpatched")
    if getattr(config, "mlp_bias", False) or model.lm_head.bias is not None:
        raise ValueError(f"{architecture} has a bias in its MLP or its lm_head, which our kernels do not add; "
                         f"leave it unpatched")
    model.__class__ = _patched(type(model), CausalLMPatch)
    for module in model.modules():
        if module is model or isinstance(module, (RMSNormPatch, DecoderLayerPatch, MLPPatch)):
            continue
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            module.__class__ = _patched(type(module), RMSNormPatch)
        elif name.endswith("DecoderLayer"):
            module.__class__ = _patched(type(module), DecoderLayerPatch)
        elif name.endswith("MLP"):
            module.__class__ = _patched(type(module), MLPPatch)
    model.set_attn_implementation(ATTENTION)
    return model


_classes: dict[tuple[type, type], type] = {}


def _patched(base: type, patch: type) -> type:
    """The subclass of base whose forward is patch's (isinstance checks on base keep holding)."""
    if issubclass(base, patch):
        return base
    if (base, patch) not in _classes:
        name, namespace = f"TritonGPT{base.__name__}", {"__module__": __name__}
        if patch is CausalLMPatch:
            name = base.__name__       # save_pretrained writes it as config.json's architecture
            # the Trainer keeps the dataset columns that forward's signature names
            namespace["forward"] = functools.wraps(base.forward)(lambda self, *args, **kwargs: patch.forward(self, *args, **kwargs))
        _classes[base, patch] = type(name, (patch, base), namespace)
    return _classes[base, patch]


class RMSNormPatch:
    """x / rms(x) * weight through kernels.rms_norm; with residual: (norm(x + residual), x + residual)."""

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None):
        return kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon, residual=residual)


class DecoderLayerPatch:
    """The pre-norm block with the attention's residual add fused into the post-attention norm."""

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        if attended.dtype == hidden_states.dtype:
            normed, hidden_states = self.post_attention_layernorm(attended, hidden_states)
        else:                                        # autocast: a low-precision output onto an fp32 stream
            hidden_states = hidden_states + attended
            normed = self.post_attention_layernorm(hidden_states)
        return hidden_states + self.mlp(normed)


class MLPPatch:
    """down_proj(silu(gate_proj(x)) * up_proj(x)), the activation recomputed in the backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)                       # (..., intermediate)
        if torch.is_grad_enabled() and gate.requires_grad and type(self.down_proj) is nn.Linear:   # not peft's
            rows = gate.shape[-1]
            out = _SwiGLUDown.apply(gate.reshape(-1, rows), up.reshape(-1, rows), self.down_proj.weight)
            return out.view(*x.shape[:-1], -1)
        return self.down_proj(kernels.swiglu(gate, up))


class CausalLMPatch:
    """With labels, the loss by kernels.linear_cross_entropy, never the full logits in training."""

    def forward(self, *args, **kwargs):
        call = inspect.signature(super().forward).bind(*args, **kwargs).arguments   # by name, as the base reads them
        call.update(call.pop("kwargs", {}))
        labels, shift_labels = call.pop("labels", None), call.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            return super().forward(*args, **kwargs)
        logits_to_keep = call.pop("logits_to_keep", 0)
        items = call.pop("num_items_in_batch", None)          # the Trainer's token count across accumulation
        call.pop("return_dict", None)
        outputs = self.model(**call)
        hidden = outputs.last_hidden_state                    # (B, T, C)
        if shift_labels is None:                              # token t predicts label t + 1
            shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        loss = kernels.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight,
                                            shift_labels.reshape(-1).to(hidden.device), ignore_index=IGNORE_INDEX,
                                            reduction="mean" if items is None else "sum")
        if items is not None:
            loss = loss / torch.as_tensor(items, device=loss.device)
        logits = None
        if not self.training:
            kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, kept, :])
        carried = {field.name: getattr(outputs, field.name) for field in dataclasses.fields(CausalLMOutputWithPast)
                   if field.name not in ("loss", "logits") and hasattr(outputs, field.name)}
        return CausalLMOutputWithPast(loss=loss, logits=logits, **carried)


def tritongpt_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    """transformers' attention interface: query (B, Hq, Tq, D), key and value (B, Hkv, Tk, D), the
    queries being the last Tq of the Tk positions -> ((B, Tq, Hq, D), None). attention_mask is the
    2-D (B, Tk) mask of real tokens, or None when there is no padding."""
    if dropout:
        raise ValueError(f"attention dropout {dropout} is not in our attention kernel; set the config's "
                         f"attention_dropout to 0 before apply_tritongpt_kernels")
    options = dict(causal=kwargs.get("is_causal", getattr(module, "is_causal", True)), scale=scaling,
                   window_size=(sliding_window - 1, 0) if sliding_window else (-1, -1), softcap=softcap or 0.0)
    B, Hq, Tq, D = query.shape
    if "cu_seq_lens_q" in kwargs:                         # packed by transformers' DataCollatorWithFlattening
        lengths = (kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], kwargs["max_length_q"], kwargs["max_length_k"])
        return _varlen(query, key, value, *lengths, options).view(B, Tq, Hq, D), None
    if attention_mask is None and B == 1 and Tq == key.shape[2] and kwargs.get("position_ids") is not None:
        documents = _packed_documents(kwargs["position_ids"])
        if documents is not None:                         # several sequences in one row, positions from 0 each
            cu, longest = documents
            return _varlen(query, key, value, cu, cu, longest, longest, options).view(B, Tq, Hq, D), None
    if attention_mask is None:
        return kernels.attention(query, key, value, **options).transpose(1, 2), None
    return _unpadded(query, key, value, attention_mask, options), None


def _packed_documents(position_ids: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(cu_seqlens, longest) of the sequences packed in a row whose positions restart at 0, or None
    for one sequence."""
    starts = torch.nonzero(position_ids[0] == 0).flatten()                          # (documents,)
    if len(starts) <= 1:
        return None
    cu = F.pad(starts, (0, 1), value=position_ids.shape[1]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _varlen(query, key, value, cu_q, cu_k, max_q, max_k, options) -> torch.Tensor:
    """Packed tokens (batch 1): (1, H, total, D) in, (total, Hq, D) out."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))                 # (total, H, D)
    return kernels.varlen_attention(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k),
                                    **options)


def _unpadded(query, key, value, mask, options) -> torch.Tensor:
    """Attention over the real tokens only: mask (B, Tk), true at a real token. Padded query rows come
    back as zeros."""
    B, Hq, Tq, D = query.shape
    mask = mask.bool()
    key, value = key[:, :, :mask.shape[1]], value[:, :, :mask.shape[1]]           # a static cache's unused tail
    queries = mask[:, -Tq:]                                                        # (B, Tq)
    q = query.transpose(1, 2)[queries]                                             # (real queries, Hq, D)
    k, v = key.transpose(1, 2)[mask], value.transpose(1, 2)[mask]                  # (real keys, Hkv, D)
    q_lengths, k_lengths = queries.sum(1, dtype=torch.int32), mask.sum(1, dtype=torch.int32)
    cu_q, cu_k = F.pad(q_lengths.cumsum(0, dtype=torch.int32), (1, 0)), F.pad(k_lengths.cumsum(0, dtype=torch.int32), (1, 0))
    out = kernels.varlen_attention(q, k, v, cu_q, cu_k, int(q_lengths.max()), int(k_lengths.max()), **options)
    return out.new_zeros(B, Tq, Hq, D).index_put((queries,), out)


AttentionInterface.register(ATTENTION, tritongpt_attention)
# The mask FlashAttention gets: None without padding, else the 2-D mask of real tokens.
AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])

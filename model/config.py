"""Model configuration: one dataclass, named presets, keyword overrides and a JSON round trip."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

PRESETS: dict[str, dict] = {
    # A few hundred thousand parameters plus embeddings: CPU tests and the 10-minute CPU run.
    "tiny": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, block_size=256),
    # GPT-2-small class (~124M with a 50k vocabulary).
    "small": dict(n_layer=12, n_head=12, n_kv_head=4, n_embd=768, block_size=1024),
    # GPT-2-medium class (~350M with a 50k vocabulary).
    "medium": dict(n_layer=24, n_head=16, n_kv_head=8, n_embd=1024, block_size=1024),
}


LLAMA3_KEYS = {"rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}


@dataclass
class ModelConfig:
    vocab_size: int = 32768
    block_size: int = 1024          # longest sequence (RoPE table size, KV cache capacity)
    n_layer: int = 12
    n_head: int = 12                # query heads
    n_kv_head: int = 4              # key/value heads; n_head % n_kv_head == 0 (GQA; 1 is MQA)
    n_embd: int = 768
    mlp_hidden: int = 0             # SwiGLU width; 0 means 8/3 * n_embd rounded up to a multiple of 64
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Llama 3's frequency scaling, as transformers' config writes it: {"rope_type": "llama3",
    # "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}; None: none
    rope_scaling: dict | None = None
    tie_embeddings: bool = True     # the LM head is the embedding matrix; False: a separate head
    attn_window: int = 0            # sliding window: a token sees itself and the attn_window - 1 before it; 0: all
    attn_softcap: float = 0.0       # > 0: attention scores s become attn_softcap * tanh(s / attn_softcap)
    init_std: float = 0.02
    extra: dict = field(default_factory=dict)  # free-form notes carried with checkpoints

    def __post_init__(self):
        if self.mlp_hidden == 0:
            self.mlp_hidden = -(-8 * self.n_embd // 3 // 64) * 64
        problems = []
        if self.n_embd % self.n_head:
            problems.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        elif self.head_dim % 2:
            problems.append(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            problems.append(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "mlp_hidden"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.attn_window < 0:
            problems.append(f"attn_window must be >= 0 (0: no sliding window), got {self.attn_window}")
        if not 0.0 <= self.attn_softcap < float("inf"):
            problems.append(f"attn_softcap must be a finite number >= 0 (0: off), got {self.attn_softcap}")
        scaling = self.rope_scaling
        if scaling is not None and (scaling.get("rope_type") != "llama3" or not LLAMA3_KEYS <= set(scaling)):
            problems.append(f"rope_scaling must be None or Llama 3's {{'rope_type': 'llama3', "
                            f"{', '.join(sorted(LLAMA3_KEYS - {'rope_type'}))}}}, got {scaling}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def attention_options(self) -> dict:
        """The window_size and softcap arguments of kernels.attention for this model."""
        return dict(window_size=(self.attn_window - 1 if self.attn_window else -1, 0), softcap=self.attn_softcap)

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}; known fields: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

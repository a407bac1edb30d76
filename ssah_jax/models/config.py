"""ModelConfig: the Llama-family architecture we implement, read from a transformers config.

Anything in a transformers config that changes the computation and that we do not implement
(sliding windows, another activation, an unknown rope scaling, ...) is an error naming the
attribute: a model that silently computes something else is worse than one that refuses.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedConfigError(ValueError):
    """A transformers config asks for something this model does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (transformers 5 ``rope_parameters``)."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inverse_frequencies(self, head_dim: int) -> np.ndarray:
        """`[head_dim // 2] float32` inverse frequencies, after scaling."""
        inv_freq = 1.0 / (self.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        if self.type == "linear":
            inv_freq = inv_freq / self.factor
        elif self.type == "llama3":
            # Llama 3.1 frequency-dependent scaling (Meta's reference implementation).
            low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
            high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
            inv_freq = np.where(
                wavelen > low_wavelen,
                inv_freq / self.factor,
                np.where(wavelen < high_wavelen, inv_freq, smoothed),
            )
        return inv_freq.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2, SmolLM2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def num_query_groups(self) -> int:
        """Query heads that share one key/value head (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    @property
    def logical_sizes(self) -> dict[str, int]:
        """The size of each sharded logical axis of the parameters (heads counted whole: a head
        is never split over devices), what :func:`ssah_jax.sharding.check_divides` checks."""
        return {"vocab": self.vocab_size, "embed": self.hidden_size, "heads": self.num_heads,
                "kv_heads": self.num_kv_heads, "mlp": self.intermediate_size}

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Builds a ModelConfig from a transformers ``PretrainedConfig``; rejects what we lack."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"model_type={model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})"
            )
        _reject_unsupported(hf_config)
        get = lambda name, default=None: getattr(hf_config, name, default)  # noqa: E731
        num_heads = hf_config.num_attention_heads
        head_dim = get("head_dim") or hf_config.hidden_size // num_heads
        attention_bias = bool(get("attention_bias", False))
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            rope=_rope_from_hf(hf_config),
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and no o bias; Llama's attention_bias covers all four.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(get("mlp_bias", False)),
            model_type=model_type,
            bos_token_id=get("bos_token_id"),
            eos_token_ids=_as_tuple(get("eos_token_id")),
        )

    def to_hf(self) -> Any:
        """The equivalent transformers config (for export)."""
        from transformers import AutoConfig

        rope: dict[str, Any] = {"rope_type": self.rope.type, "rope_theta": self.rope.theta}
        if self.rope.type in ("linear", "llama3"):
            rope["factor"] = self.rope.factor
        if self.rope.type == "llama3":
            rope["low_freq_factor"] = self.rope.low_freq_factor
            rope["high_freq_factor"] = self.rope.high_freq_factor
            rope["original_max_position_embeddings"] = self.rope.original_max_position_embeddings
        kwargs: dict[str, Any] = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_parameters=rope,
            hidden_act="silu",
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else
            (self.eos_token_ids[0] if self.eos_token_ids else None),
        )
        if self.model_type == "qwen2":
            if self.o_bias or self.mlp_bias or not self.qkv_bias:
                raise UnsupportedConfigError("qwen2 has q/k/v biases only; this bias pattern is not qwen2")
        else:
            if self.qkv_bias != self.o_bias:
                raise UnsupportedConfigError(f"{self.model_type} cannot express q/k/v bias without o bias")
            kwargs.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        return AutoConfig.for_model(self.model_type, **kwargs)


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _rope_from_hf(hf_config: Any) -> RopeConfig:
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"rope_parameters.rope_type={rope_type!r} is not supported "
            f"(supported: {SUPPORTED_ROPE_TYPES})"
        )
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise UnsupportedConfigError("rope_parameters.rope_theta is missing")
    if params.get("attention_factor") not in (None, 1.0):
        raise UnsupportedConfigError(
            f"rope_parameters.attention_factor={params['attention_factor']} is not supported"
        )
    kwargs: dict[str, Any] = {"theta": float(theta), "type": rope_type}
    if rope_type in ("linear", "llama3"):
        kwargs["factor"] = float(params["factor"])
    if rope_type == "llama3":
        kwargs["low_freq_factor"] = float(params["low_freq_factor"])
        kwargs["high_freq_factor"] = float(params["high_freq_factor"])
        kwargs["original_max_position_embeddings"] = int(
            params["original_max_position_embeddings"]
        )
    return RopeConfig(**kwargs)


def _reject_unsupported(hf_config: Any) -> None:
    """Raises UnsupportedConfigError naming the first attribute we would get wrong."""
    get = lambda name, default=None: getattr(hf_config, name, default)  # noqa: E731
    checks = [
        ("hidden_act", get("hidden_act", "silu") == "silu", "only 'silu' (SwiGLU) is implemented"),
        ("use_sliding_window", not get("use_sliding_window", False), "sliding-window attention"),
        (
            "sliding_window",
            get("sliding_window") is None or get("use_sliding_window") is False,
            "sliding-window attention",
        ),
        ("layer_types", _all_full_attention(get("layer_types")), "non-full attention layers"),
        ("attention_dropout", not get("attention_dropout", 0.0), "attention dropout"),
        ("pretraining_tp", get("pretraining_tp", 1) == 1, "tensor-parallel pretraining slices"),
        ("is_encoder_decoder", not get("is_encoder_decoder", False), "encoder-decoder models"),
    ]
    for name, ok, what in checks:
        if not ok:
            raise UnsupportedConfigError(
                f"config attribute {name}={get(name)!r} is not supported ({what} is not implemented)"
            )


def _all_full_attention(layer_types: Any) -> bool:
    return layer_types is None or all(t == "full_attention" for t in layer_types)

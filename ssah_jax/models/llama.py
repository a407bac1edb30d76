"""Flax NNX decoder for the Llama family (Llama 2/3/3.x, Mistral, Qwen2, SmolLM2).

Weight layout (the one place it is defined):
    Flax kernels are ``[in, out]``; transformers' ``nn.Linear`` weights are ``[out, in]``.
    By default each layer owns its arrays (``layers/{i}/...``) and the forward pass is a Python
    loop over layers, unrolled by jit: the canonical layout, which import / export, unit maps,
    masks, pruning, LoRA and attribution speak, and the one to decode with (a stacked
    ``lax.scan`` layout copies every layer's weights out of the stack at each step on CPU,
    which made decoding twice as slow). ``Layout(scan=True)``
    stacks the layers on a leading ``layers`` axis and scans them (compile time and program
    size independent of depth: for training large models); :mod:`ssah_jax.models.layout`
    converts parameters, masks and models between the two, losslessly.
    An SSAH *unit* is an input channel of ``o_proj`` / ``down_proj``: a **row** of our kernel
    ``layers[l].attn.o_proj.kernel[j, :]`` (``layers[l].mlp.down_proj.kernel[j, :]``), which is a
    **column** of the HF matrix ``o_proj.weight[:, j]`` (``down_proj.weight[:, j]``); in the
    stacked layout, ``layers.attn.o_proj.kernel[l, j, :]``.

Attention: training and prefill run ``jax.nn.dot_product_attention`` (:func:`sequence_attention`)
with our explicit masks; decoding and extra queries run the grouped-query :func:`attend` on the
head-major KV cache.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssah_jax.models.config import ModelConfig, RopeConfig
from ssah_jax.models.layout import Layout, checkpointed, stack_layers, stack_trees, unstack_layers
from ssah_jax.sharding import constrain

Dtype = Any


def _meta(*names: str | None) -> dict[str, Any]:
    # Sharding is applied explicitly (sharding.shard_model / jit shardings), never at creation,
    # so a model can be built on one device and placed on any mesh afterwards.
    return {"out_sharding": names, "eager_sharding": False}


class Dense(nnx.Linear):
    """``nnx.Linear`` whose dot takes its inputs in the *parameter* dtype, accumulates in
    float32 and returns the compute dtype.

    With bf16 parameters and fp32 compute (weights-only bf16), only the matmul inputs are
    rounded; activations stay fp32. Accumulating in float32 is what accelerators do anyway,
    and in our CPU trials it was faster than a bf16-output dot.
    """

    def __call__(self, x):
        kernel = self.kernel[...]
        y = jnp.dot(x.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def _dense(d_in, d_out, names, *, bias, dtype, param_dtype, rngs) -> Dense:
    return Dense(
        d_in,
        d_out,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(0.02),
        kernel_metadata=_meta(*names),
        bias_metadata=_meta(names[-1]),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, scaled in the compute dtype (as transformers does)."""

    def __init__(self, dim: int, eps: float, *, dtype: Dtype, param_dtype: Dtype):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **_meta("norm"))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


@functools.cache
def _inverse_frequencies(rope: RopeConfig, head_dim: int):
    return rope.inverse_frequencies(head_dim)


def apply_rope(x: jax.Array, positions: jax.Array, rope: RopeConfig) -> jax.Array:
    """Rotary embedding, half-split convention. x: ``[B, S, heads, D]``, positions ``[B, S]``."""
    inv_freq = jnp.asarray(_inverse_frequencies(rope, x.shape[-1]))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, D/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class LayerCache(NamedTuple):
    """Keys and values of one layer: ``[B, kv_heads, T, D]`` each (head-major, so decoding
    attends to the cache without transposing it)."""

    k: jax.Array
    v: jax.Array


# The logical layout of a layer's cache ``[B, K, T, D]``: the decode batch over the data-parallel
# axes, the kv heads over the tensor axis (each device keeps the keys of the heads it attends with).
CACHE_AXES = ("act_batch", "act_kv_heads", "act_kv_len", "act_head_dim")


class KVCache(NamedTuple):
    """KV cache: one LayerCache per layer, or one stacked LayerCache ``[layers, B, K, T, D]``
    (what a scanned model runs on; it also takes the per-layer form, at the price of stacking
    and unstacking it in every call); ``index`` = slots already written (int32 scalar)."""

    layers: tuple[LayerCache, ...] | LayerCache
    index: jax.Array

    @property
    def stacked(self) -> bool:
        return isinstance(self.layers, LayerCache)

    @property
    def length(self) -> int:
        return (self.layers if self.stacked else self.layers[0]).k.shape[-2]

    @classmethod
    def init(cls, config: ModelConfig, batch: int, length: int, dtype: Dtype, *, stacked: bool = False) -> KVCache:
        """An empty cache, laid out on the active mesh (if any) as :data:`CACHE_AXES` say."""
        shape = (batch, config.num_kv_heads, length, config.head_dim)
        if stacked:
            full = (config.num_layers, *shape)
            zeros = lambda: constrain(jnp.zeros(full, dtype), ("layers", *CACHE_AXES))  # noqa: E731
            return cls(LayerCache(zeros(), zeros()), jnp.zeros((), jnp.int32))
        zeros = lambda: constrain(jnp.zeros(shape, dtype), CACHE_AXES)  # noqa: E731
        layers = tuple(LayerCache(zeros(), zeros()) for _ in range(config.num_layers))
        return cls(layers, jnp.zeros((), jnp.int32))


def attend(q: jax.Array, k, v, mask: jax.Array) -> jax.Array:
    """Grouped-query attention of decoding and extra queries (training and prefill use
    :func:`sequence_attention`). q ``[B, S, H, D]``; k, v ``[B, K, T, D]`` with ``H = K * G``,
    or tuples of such blocks (``[B, K, T_i, D]``, read as one sequence of ``T = sum T_i`` keys
    without concatenating them: how extra queries see a KV cache plus their own keys);
    mask ``[B, S, T]`` boolean. Returns ``[B, S, H, D]``.

    Query heads are grouped under their shared kv head, so keys and values are never repeated
    or transposed. The softmax runs in float32; a row with no visible key gets a uniform
    (finite) mix instead of NaN.
    """
    ks, vs = (k, v) if isinstance(k, tuple) else ((k,), (v,))
    b, s, h, d = q.shape
    kv_heads = ks[0].shape[1]
    groups = h // kv_heads
    q = q.reshape(b, s, kv_heads, groups, d).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, s * groups, d)
    scores = jnp.concatenate([jnp.einsum("bkqd,bktd->bkqt", q, block) for block in ks], axis=-1)
    scores = scores.astype(jnp.float32) * (d**-0.5)
    visible = jnp.broadcast_to(mask[:, None, :, None, :], (b, 1, s, groups, mask.shape[-1]))
    scores = jnp.where(visible.reshape(b, 1, s * groups, -1), scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(vs[0].dtype)
    splits = np.cumsum([block.shape[2] for block in vs])[:-1]
    out, *rest = [jnp.einsum("bkqt,bktd->bkqd", p, block) for p, block in zip(jnp.split(probs, splits, axis=-1), vs)]
    for part in rest:
        out = out + part
    return out.reshape(b, kv_heads, s, groups, d).transpose(0, 2, 1, 3, 4).reshape(b, s, h, d)


def sequence_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention of training and prefill by ``jax.nn.dot_product_attention``. q ``[B, S, H, D]``;
    k, v ``[B, T, K, D]`` (sequence-major, ``H = K * G``: grouped-query attention is native);
    mask ``[B, S, T]`` boolean, passed as is (our explicit masks are honoured). Returns
    ``[B, S, H, D]``.

    ``implementation=None`` leaves the choice to JAX: in jax 0.10 that is always the XLA kernel
    (logits and softmax in float32; a row with no visible key gets a uniform finite mix, as in
    :func:`attend`). cuDNN's fused kernel is opt-in there (``implementation="cudnn"``: GPU
    only, bf16 / fp16 inputs and the shapes cuDNN supports, and a fully masked row is then not
    guaranteed finite), so it is not forced here.
    """
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=None)


class Attention(nnx.Module):
    """Grouped-query attention with rotary embeddings and an optional KV cache."""

    def __init__(self, config: ModelConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        c = config
        self.config = c
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hd = c.head_dim
        self.q_proj = _dense(c.hidden_size, c.num_heads * hd, ("embed", "heads"), bias=c.qkv_bias, **kw)
        self.k_proj = _dense(c.hidden_size, c.num_kv_heads * hd, ("embed", "kv_heads"), bias=c.qkv_bias, **kw)
        self.v_proj = _dense(c.hidden_size, c.num_kv_heads * hd, ("embed", "kv_heads"), bias=c.qkv_bias, **kw)
        self.o_proj = _dense(c.num_heads * hd, c.hidden_size, ("heads", "embed"), bias=c.o_bias, **kw)

    def unit_inputs(self, x, positions, mask, cache: LayerCache | None, cache_index, write_cache: bool = True):
        """The attention output *entering* ``o_proj`` (its SSAH units), ``[B, S, heads * head_dim]``,
        and the updated cache (the given one, untouched, when ``write_cache`` is False: the new
        tokens then attend to the cache followed by themselves)."""
        c = self.config
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, s, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, s, c.num_kv_heads, c.head_dim)
        q = constrain(apply_rope(q, positions, c.rope), ("act_batch", "act_len", "act_heads", "act_head_dim"))
        k = apply_rope(k, positions, c.rope)
        if cache is None:  # training, scoring: jax.nn.dot_product_attention on [B, S, K, D] as projected
            out = sequence_attention(q, k, v, mask)
        elif not write_cache:  # extra queries: the cache, then themselves, without concatenating
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, D]
            out = attend(q, (cache.k.astype(q.dtype), k), (cache.v.astype(q.dtype), v), mask)
        else:
            start = (0, 0, cache_index, 0)
            k = jax.lax.dynamic_update_slice(cache.k, k.transpose(0, 2, 1, 3).astype(cache.k.dtype), start)
            v = jax.lax.dynamic_update_slice(cache.v, v.transpose(0, 2, 1, 3).astype(cache.v.dtype), start)
            k, v = constrain(k, CACHE_AXES), constrain(v, CACHE_AXES)
            cache = LayerCache(k, v)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
            if s == 1:  # decoding: grouped-query attention reads the head-major cache in place
                out = attend(q, k, v, mask)
            else:  # prefill: one transpose of the cache per call, then jax.nn.dot_product_attention
                out = sequence_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
        return out.reshape(b, s, c.num_heads * c.head_dim), cache

    def __call__(self, x, positions, mask, cache: LayerCache | None, cache_index, write_cache: bool = True):
        out, cache = self.unit_inputs(x, positions, mask, cache, cache_index, write_cache)
        return self.o_proj(out), cache


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``. Units are the ``intermediate_size`` channels."""

    def __init__(self, config: ModelConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        c = config
        kw = dict(bias=c.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = _dense(c.hidden_size, c.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = _dense(c.hidden_size, c.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = _dense(c.intermediate_size, c.hidden_size, ("mlp", "embed"), **kw)

    def unit_inputs(self, x):
        """The activation entering ``down_proj`` (its SSAH units), ``[B, S, intermediate_size]``."""
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return constrain(h, ("act_batch", "act_len", "act_mlp"))

    def __call__(self, x):
        return self.down_proj(self.unit_inputs(x))


class UnitInputs(NamedTuple):
    """One layer's activations entering its two ``B`` matrices (SSAH units are their channels)."""

    attn: jax.Array  # [B, S, num_heads * head_dim], entering o_proj
    mlp: jax.Array  # [B, S, intermediate_size], entering down_proj


class Block(nnx.Module):
    """One pre-norm decoder layer."""

    def __init__(self, config: ModelConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.attn = Attention(config, rngs=rngs, **kw)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.mlp = MLP(config, rngs=rngs, **kw)

    def __call__(self, x, positions, mask, cache, cache_index, write_cache: bool = True):
        """``(output, cache, unit_inputs)``; under jit, unused unit inputs cost nothing."""
        a, cache = self.attn.unit_inputs(self.input_norm(x), positions, mask, cache, cache_index, write_cache)
        x = x + self.attn.o_proj(a)
        m = self.mlp.unit_inputs(self.post_attn_norm(x))
        x = x + self.mlp.down_proj(m)
        return constrain(x, ("act_batch", "act_len", "act_embed")), cache, UnitInputs(a, m)


class DecoderOutput(NamedTuple):
    hidden: jax.Array  # [B, S, hidden] after the final norm
    cache: KVCache | None
    hidden_states: jax.Array | None  # [L + 1, B, S, hidden]: embeddings, then each layer's output
    # (before the final norm)
    unit_inputs: tuple[UnitInputs, ...] | None = None  # per layer, with output_unit_inputs=True


def default_mask(kv_mask: jax.Array, q_len: int, cache_index) -> jax.Array:
    """Causal + padding mask ``[B, q_len, kv_len]`` for queries at slots ``cache_index + i``."""
    kv_len = kv_mask.shape[1]
    q_slots = cache_index + jnp.arange(q_len)
    causal = jnp.arange(kv_len)[None, :] <= q_slots[:, None]
    return causal[None] & kv_mask[:, None, :].astype(bool)


class CausalLM(nnx.Module):
    """Llama-family decoder with a language-model head.

    ``model(input_ids, attention_mask=None)`` returns float32 logits ``[batch, seq, vocab]``.
    ``attention_mask`` is ``[batch, kv_len]`` with 1 for real tokens (left or right padding);
    positions are counted over real tokens only.

    ``layout`` (:class:`~ssah_jax.models.Layout`): the unrolled layers (default; ``layers[i]``
    is a :class:`Block`) or one stacked :class:`Block` whose arrays carry a leading ``layers``
    axis, run by ``jax.lax.scan``; and the remat policy of each layer. Both layouts are
    initialised alike from ``rngs`` (the stacked one is :func:`stack_layers` of the unrolled
    one) and :func:`with_layout` converts a model between them.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        layout: Layout = Layout(),
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        self.layout = layout
        self.embed = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(0.02),
            embedding_metadata=_meta("vocab", "embed"),
            rngs=rngs,
        )
        blocks = [Block(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(config.num_layers)]
        if layout.scan:
            graphdef = nnx.graphdef(blocks[0])
            self.layers = nnx.merge(graphdef, stack_trees([nnx.state(b) for b in blocks]))
        else:
            self.layers = nnx.List(blocks)
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else _dense(config.hidden_size, config.vocab_size, ("embed", "vocab"), bias=False,
                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        )

    def forward(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        mask: jax.Array | None = None,
        cache: KVCache | None = None,
        write_cache: bool = True,
        embeddings: jax.Array | None = None,
        output_hidden_states: bool = False,
        output_unit_inputs: bool = False,
    ) -> DecoderOutput:
        """Runs the decoder without the LM head.

        Args:
          input_ids: ``[B, S] int32``.
          attention_mask: ``[B, kv_len]`` (1 = real token). ``kv_len`` is ``S`` without a cache
            and the cache length with one (covering every slot, written or not).
          positions: optional rotary positions ``[B, S]`` of the new tokens; by default each
            token's count of real tokens before it (left padding does not shift positions).
          mask: optional explicit boolean mask ``[B, S, kv_len]`` (``[B, S, kv_len + S]`` when
            ``write_cache`` is False). When given it *replaces* the causal + padding mask
            (build on :func:`default_mask` to extend it).
          cache: optional KV cache; the ``S`` new tokens are written at ``cache.index``.
          write_cache: with a cache, False runs the new tokens as *extra queries*: they attend
            to the cache's slots and then to each other (causally, by default), and the cache
            is returned as given, neither written nor advanced (default positions continue
            from ``cache.index``). A public seam for queries that must leave the
            cache as it is, e.g. scoring several continuations of one cached context (the
            safety signal's check instead rides in the step's own forward; see
            :mod:`ssah_jax.signals.decoding`).
          embeddings: optional input embeddings ``[B, S, hidden]`` used instead of looking up
            ``input_ids`` (which then only give the shape): a row that is no token of the
            vocabulary, such as the safety signal's ``[CLS]``, enters here.
          output_hidden_states: also return every layer's output.
          output_unit_inputs: also return every layer's :class:`UnitInputs` (the activations
            the SSAH scores are computed from).
        """
        b, s = input_ids.shape
        if cache is None:
            kv_len, index = s, jnp.zeros((), jnp.int32)
        else:
            kv_len, index = cache.length, cache.index
        if attention_mask is None:
            if cache is not None:
                raise ValueError("attention_mask [batch, cache_length] is required with a cache")
            attention_mask = jnp.ones((b, s), jnp.int32)
        if attention_mask.shape != (b, kv_len):
            raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected {(b, kv_len)}")
        extra = cache is not None and not write_cache
        written = attention_mask.astype(bool) & (jnp.arange(kv_len) < index)[None]  # real tokens in the cache
        if positions is None and extra:
            positions = jnp.sum(written, axis=1, keepdims=True, dtype=jnp.int32) + jnp.arange(s)[None]
        elif positions is None:
            counts = jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1
            positions = jnp.maximum(jax.lax.dynamic_slice_in_dim(counts, index, s, axis=1), 0)
        elif positions.shape != (b, s):
            raise ValueError(f"positions has shape {positions.shape}, expected {(b, s)}")
        if mask is None and extra:
            causal = jnp.tril(jnp.ones((s, s), bool))
            mask = jnp.concatenate([jnp.broadcast_to(written[:, None, :], (b, s, kv_len)),
                                    jnp.broadcast_to(causal[None], (b, s, s))], axis=-1)
        elif mask is None:
            mask = default_mask(attention_mask, s, index)
        elif mask.shape != (b, s, kv_len + s * extra):
            raise ValueError(f"mask has shape {mask.shape}, expected {(b, s, kv_len + s * extra)}")

        if embeddings is None:
            embeddings = self.embed(input_ids)
        elif embeddings.shape != (b, s, self.config.hidden_size):
            raise ValueError(f"embeddings has shape {embeddings.shape}, expected {(b, s, self.config.hidden_size)}")
        x = constrain(embeddings.astype(self.dtype), ("act_batch", "act_len", "act_embed"))

        def step(graphdef, state, x, layer_cache):
            return nnx.merge(graphdef, state)(x, positions, mask, layer_cache, index, write_cache)

        run = self._scanned if self.layout.scan else self._unrolled
        x, new_cache, hidden_states, unit_inputs = run(step, x, cache, write_cache, output_hidden_states,
                                                       output_unit_inputs)
        if cache is not None and write_cache:
            cache = KVCache(new_cache, index + s)
        return DecoderOutput(self.final_norm(x), cache, hidden_states, unit_inputs)

    def _unrolled(self, step, x, cache, write_cache, output_hidden_states, output_unit_inputs):
        """The layers one after the other: ``(x, cache layers, hidden states, unit inputs)``."""
        del write_cache  # each layer's step knows it
        if cache is None:
            caches = [None] * self.config.num_layers
        elif cache.stacked:
            caches = [LayerCache(cache.layers.k[i], cache.layers.v[i]) for i in range(self.config.num_layers)]
        else:
            caches = cache.layers
        hidden_states = [x]
        new_cache, unit_inputs = [], []
        for layer, layer_cache in zip(self.layers, caches):
            graphdef, state = nnx.split(layer)
            layer_step = checkpointed(functools.partial(step, graphdef), self.layout.remat, in_scan=False)
            x, layer_cache, inputs = layer_step(state, x, layer_cache)
            new_cache.append(layer_cache)
            hidden_states.append(x)
            unit_inputs.append(inputs)
        return (x, _stack_cache(new_cache) if cache is not None and cache.stacked else tuple(new_cache),
                jnp.stack(hidden_states) if output_hidden_states else None,
                tuple(unit_inputs) if output_unit_inputs else None)

    def _scanned(self, step, x, cache, write_cache, output_hidden_states, output_unit_inputs):
        """The stacked layers under ``jax.lax.scan``, the same outputs as :meth:`_unrolled`."""
        graphdef, state = nnx.split(self.layers)
        writes = cache is not None and write_cache
        layer_step = checkpointed(functools.partial(step, graphdef), self.layout.remat, in_scan=True)

        def body(x, xs):
            layer_state, layer_cache = xs
            x, layer_cache, inputs = layer_step(layer_state, x, layer_cache)
            # Only what the caller asked for leaves the loop (each output is [L, ...]).
            return x, (layer_cache if writes else None, x if output_hidden_states else None,
                       inputs if output_unit_inputs else None)

        caches = None if cache is None else cache.layers if cache.stacked else _stack_cache(cache.layers)
        last, (new_cache, hidden, inputs) = jax.lax.scan(body, x, (state, caches))
        if writes and not cache.stacked:
            new_cache = tuple(LayerCache(new_cache.k[i], new_cache.v[i]) for i in range(self.config.num_layers))
        hidden_states = jnp.concatenate([x[None], hidden]) if output_hidden_states else None
        unit_inputs = (tuple(UnitInputs(inputs.attn[i], inputs.mlp[i]) for i in range(self.config.num_layers))
                       if output_unit_inputs else None)
        return last, new_cache, hidden_states, unit_inputs

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head: ``[..., hidden] -> [..., vocab] float32``."""
        # Logits stay float32 in bf16 mode too: the head's dot accumulates and returns f32.
        if self.lm_head is None:
            table = self.embed.embedding[...]
            out = jnp.einsum("...d,vd->...v", hidden.astype(table.dtype), table, preferred_element_type=jnp.float32)
        else:
            kernel = self.lm_head.kernel[...]
            out = jnp.einsum("...d,dv->...v", hidden.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)
        names = ("act_batch",) + ("act_len",) * (out.ndim - 2) + ("act_vocab",)
        return constrain(out, names)

    def __call__(self, input_ids, attention_mask=None, *, mask=None) -> jax.Array:
        return self.logits(self.forward(input_ids, attention_mask, mask=mask).hidden)


def _stack_cache(layers) -> LayerCache:
    return LayerCache(jnp.stack([c.k for c in layers]), jnp.stack([c.v for c in layers]))


def with_layout(model: CausalLM, layout: Layout) -> CausalLM:
    """``model`` in ``layout``: the same parameters (bit for bit) stacked or unstacked as the
    layout needs, and its remat policy (``model`` itself when it is in ``layout`` already).
    ``model`` itself is left as it is."""
    if model.layout == layout:
        return model
    param_dtype = model.embed.embedding.get_value().dtype
    target = nnx.eval_shape(lambda: CausalLM(model.config, dtype=model.dtype, param_dtype=param_dtype,
                                             layout=layout, rngs=nnx.Rngs(0)))
    state = nnx.to_pure_dict(nnx.state(model))
    if model.layout.scan and not layout.scan:
        state = unstack_layers(state)
    elif layout.scan and not model.layout.scan:
        state = stack_layers(state)
    return nnx.merge(nnx.graphdef(target), state)


def next_token_logprobs(model: CausalLM, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """``log p(token_t | tokens_<t)`` for ``t = 1 .. L-1``, float32 ``[B, L - 1]`` (traceable)."""
    logits = model(input_ids, attention_mask)[:, :-1]
    # The target's logit by a select-and-sum, not a gather: under jax.grad (training, SNIP) a
    # gather turns into a scatter over [B, L, vocab], which is slow on CPU.
    is_target = jnp.arange(logits.shape[-1]) == input_ids[:, 1:, None]
    picked = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
    return picked - jax.nn.logsumexp(logits, axis=-1)

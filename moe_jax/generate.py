"""Sampling with a key/value cache: the prompt in one forward pass (prefill), then one token per step.

The cache is fixed-size, `k` and `v` [L, B, S_max, K, H] with S_max = prompt + new tokens, so the
decode step compiles once per `generate` shape. The model runs at inference settings
(`moe_jax.evaluate.inference_config`: dropless routing, no router jitter): greedy decoding gives the
argmax of full forward passes over the growing sequence. GQA and MLA attention: for MLA the cache holds
the per-head keys [.., N, Z+Y] and values [.., N, U] (the latent expanded, as the training path does).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.attention import Attention
from moe_jax.config import ModelConfig
from moe_jax.evaluate import for_inference
from moe_jax.mla import MLAttention
from moe_jax.model import GPT
from moe_jax.rope import model_rope_tables


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> dict[str, jax.Array]:
    """Zeroed `k`, `v` [L, B, S_max, K, H] in the compute dtype (MLA: K = N heads, H = Z+Y for k and
    U for v)."""
    lead = (cfg.num_layers, batch, max_len)
    if cfg.attention_type == "mla":
        k_shape = lead + (cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        v_shape = lead + (cfg.num_heads, cfg.v_head_dim)
    else:
        k_shape = v_shape = lead + (cfg.num_kv_heads, cfg.head_dim_)
    return {"k": jnp.zeros(k_shape, cfg.dtype), "v": jnp.zeros(v_shape, cfg.dtype)}


def cached_attention(q_BSNH: jax.Array, k_BTKH: jax.Array, v_BTKU: jax.Array, pos: jax.Array,
                     scale: float | None = None) -> jax.Array:
    """Causal GQA attention of S queries at positions pos..pos+S-1 over a cache of T positions
    (entries past the last query are masked); softmax in float32; `scale` default H^-0.5. Values may
    have their own head dim U (MLA)."""
    b, s, n, h = q_BSNH.shape
    kv, t = k_BTKH.shape[2], k_BTKH.shape[1]
    q = q_BSNH.reshape(b, s, kv, n // kv, h)
    scale = h ** -0.5 if scale is None else scale
    scores = jnp.einsum("bskgh,btkh->bkgst", q, k_BTKH, preferred_element_type=jnp.float32) * scale
    visible_ST = jnp.arange(t)[None, :] <= pos + jnp.arange(s)[:, None]
    scores = jnp.where(visible_ST[None, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BTKU.dtype)
    return jnp.einsum("bkgst,btku->bskgu", probs, v_BTKU).reshape(b, s, n, v_BTKU.shape[-1])


def forward_cached(model: GPT, tokens_BS: jax.Array, cache: dict, pos: jax.Array):
    """Logits [B, S, V] of tokens at positions pos..pos+S-1, given the cache of positions < pos;
    returns the cache with this chunk's keys and values written in."""
    cfg = model.cfg
    s, s_max = tokens_BS.shape[1], cache["k"].shape[2]
    x = jnp.take(model.embed_VD[...], tokens_BS, axis=0).astype(jnp.dtype(cfg.dtype))
    cos, sin = model_rope_tables(cfg, s_max)
    cos, sin = (jax.lax.dynamic_slice_in_dim(t, pos, s, axis=0) for t in (cos, sin))
    k_cache, v_cache = cache["k"], cache["v"]
    for i, block in enumerate(model.layers()):
        q, k, v = block.attn.qkv(block.attn_norm(x), cos, sin)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), (i, 0, pos, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), (i, 0, pos, 0, 0))
        scale = getattr(block.attn, "scale", None)  # MLA's softmax scale (YaRN's mscale included)
        x = x + block.attn.out(cached_attention(q, k_cache[i], v_cache[i], pos, scale))
        h = block.mlp_norm(x)
        y = block.mlp(h)[0] if block.is_moe else block.mlp(h)
        x = x + y.astype(x.dtype)
    return model.final_norm(x) @ model.head(), {"k": k_cache, "v": v_cache}


def nucleus_logits(logits_BV: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits with everything outside the top-p nucleus at -inf: the smallest set of most likely
    tokens whose probabilities sum to >= top_p (the most likely token always stays)."""
    probs = jax.nn.softmax(logits_BV, axis=-1)
    sorted_BV = -jnp.sort(-probs, axis=-1)
    before_BV = jnp.cumsum(sorted_BV, axis=-1) - sorted_BV  # mass of the more likely tokens
    threshold_B = jnp.min(jnp.where(before_BV < top_p, sorted_BV, jnp.inf), axis=-1)
    return jnp.where(probs >= threshold_B[:, None], logits_BV, -jnp.inf)


def sample(logits_BV: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
           vocab_limit: jax.Array) -> jax.Array:
    """Next tokens [B]: argmax at temperature 0, else top-p sampling at that temperature; ids at or
    past `vocab_limit` (a tokenizer smaller than the model's vocabulary) are never chosen."""
    logits = logits_BV.astype(jnp.float32)
    logits = jnp.where(jnp.arange(logits.shape[-1])[None, :] < vocab_limit, logits, -jnp.inf)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = nucleus_logits(logits / jnp.maximum(temperature, 1e-6), top_p)
    drawn = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _step(graphdef, state, tokens_BS, cache, pos, key, temperature, top_p, vocab_limit):
    logits, cache = forward_cached(nnx.merge(graphdef, state), tokens_BS, cache, pos)
    return sample(logits[:, -1], key, temperature, top_p, vocab_limit), cache


def check_prompt(prompt_ids, vocab_size: int) -> np.ndarray:
    """The prompt as int32 [B, P]; ValueError for an empty prompt or ids outside [0, vocab_size)."""
    p = np.asarray(prompt_ids)
    if p.ndim == 1:
        p = p[None, :]
    if p.ndim != 2 or p.shape[1] == 0 or not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"prompt of shape {p.shape} and dtype {p.dtype} is invalid: need at least one "
                         f"integer token id, as [P] or [B, P]")
    bad = np.argwhere((p < 0) | (p >= vocab_size))
    if bad.size:
        b, j = bad[0]
        raise ValueError(f"prompt token id {int(p[b, j])} (position {j}) is outside the model's vocabulary "
                         f"[0, {vocab_size})")
    return p.astype(np.int32)


def generate(model: GPT, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             rng: jax.Array | int | None = None, eos_id: int | None = None,
             vocab_limit: int | None = None) -> np.ndarray:
    """New token ids [B, n] after `prompt_ids` ([P] or [B, P]): n = max_new_tokens, or fewer when
    every row has produced `eos_id` (a row's tokens after its EOS repeat it). temperature 0 = greedy;
    `rng`: a key or int seed for sampling; `vocab_limit`: sample only ids below it."""
    cfg = model.cfg
    if not isinstance(model.layer(0).attn, (Attention, MLAttention)):
        raise ValueError(f"generate: decoding with a KV cache supports GQA and MLA attention, not "
                         f"{type(model.layer(0).attn).__name__}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: must be an int >= 1")
    if not (temperature >= 0 and np.isfinite(temperature)):
        raise ValueError(f"temperature={temperature!r} is invalid: must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is invalid: must be in (0, 1]")
    prompt = check_prompt(prompt_ids, cfg.vocab_size)
    s_max = prompt.shape[1] + max_new_tokens
    if s_max > cfg.max_seq_len:
        raise ValueError(f"prompt ({prompt.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {s_max} "
                         f"exceeds the model's max_seq_len={cfg.max_seq_len}")
    key = rng if isinstance(rng, jax.Array) else jax.random.key(0 if rng is None else int(rng))
    graphdef, state = nnx.split(for_inference(model))
    args = (jnp.float32(temperature), jnp.float32(top_p),
            jnp.int32(cfg.vocab_size if vocab_limit is None else vocab_limit))
    cache = init_cache(cfg, prompt.shape[0], s_max)
    tokens, pos, out = jnp.asarray(prompt), 0, []
    done = np.zeros(prompt.shape[0], bool)
    for t in range(max_new_tokens):
        tok, cache = _step(graphdef, state, tokens, cache, jnp.int32(pos), jax.random.fold_in(key, t), *args)
        pos += tokens.shape[1]
        tok_host = np.asarray(tok)
        if eos_id is not None:
            tok_host = np.where(done, eos_id, tok_host)
            done |= tok_host == eos_id
        out.append(tok_host)
        if eos_id is not None and done.all():
            break
        tokens = jnp.asarray(tok_host)[:, None]
    return np.stack(out, axis=1)

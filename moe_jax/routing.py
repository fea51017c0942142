"""Pure routing math (Megatron-Core semantics): scores, top-k, group-limited top-k, expert bias,
capacity dropping and the router losses.

`route(logits[T,E], cfg)` turns router logits into a `Routing`: which k experts each token goes to,
with which gate weight, which assignments survive the per-expert capacity, and the named auxiliary
losses (already multiplied by their coefficients). Everything has static shapes and is jit-able.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from moe_jax.config import MoEConfig, capacity

_EPS = 1e-20  # Megatron's guard in the sum-normalisation of sigmoid-like scores


@flax.struct.dataclass
class Assignment:
    """Which k experts each of T tokens goes to, with which gate weight: what the dispatchers move
    (one pytree; it crosses `shard_map` whole)."""

    weights: jax.Array            # [T,k] gate values (router dtype); exactly 0 where dropped
    experts: jax.Array            # [T,k] int32 chosen experts, distinct per token
    kept: jax.Array               # [T,k] bool; False where dropped by capacity
    tokens_per_expert: jax.Array  # [E] int32 kept assignments per expert

    @classmethod
    def of(cls, weights_Tk, experts_Tk, kept_Tk, num_experts: int) -> "Assignment":
        """An assignment with its per-expert counts computed from `kept`."""
        return cls(weights=weights_Tk, experts=experts_Tk, kept=kept_Tk,
                   tokens_per_expert=expert_counts(experts_Tk, num_experts, kept_Tk))

    @property
    def num_experts(self) -> int:
        return self.tokens_per_expert.shape[0]

    def recount(self) -> "Assignment":
        """The same assignment with counts of its own tokens (a shard's or a chunk's)."""
        return Assignment.of(self.weights, self.experts, self.kept, self.num_experts)

    def rows(self, start: int, stop: int) -> "Assignment":
        """Tokens [start, stop) with their counts."""
        sl = slice(start, stop)
        return Assignment.of(self.weights[sl], self.experts[sl], self.kept[sl], self.num_experts)


@flax.struct.dataclass
class Routing:
    """The router's decision for T tokens over E experts (the `assignment`) and its statistics."""

    assignment: Assignment
    dropped: jax.Array            # int32 scalar: dropped (token, slot) assignments
    losses: dict                  # name -> scalar, already multiplied by its coefficient
    routed_counts: jax.Array      # [E] int32 assignments per expert before dropping

    weights = property(lambda self: self.assignment.weights)
    experts = property(lambda self: self.assignment.experts)
    kept = property(lambda self: self.assignment.kept)
    tokens_per_expert = property(lambda self: self.assignment.tokens_per_expert)
    num_experts = property(lambda self: self.assignment.num_experts)


def router_dtype(cfg: MoEConfig):
    """The float dtype of router math; float64 needs `jax_enable_x64`."""
    if cfg.router_dtype == "float64":
        if not jax.config.jax_enable_x64:
            raise ValueError("MoEConfig.router_dtype='float64' needs 64-bit JAX: enable it with "
                             "jax.config.update('jax_enable_x64', True) (or `with jax.enable_x64(True)`),"
                             " or use router_dtype='float32'")
        return jnp.float64
    return jnp.float32


def score(logits_TE: jax.Array, fn: str) -> jax.Array:
    """Per-expert scores: softmax over E, sigmoid, or sqrt(softplus)."""
    if fn == "softmax":
        return jax.nn.softmax(logits_TE, axis=-1)
    if fn == "sigmoid":
        return jax.nn.sigmoid(logits_TE)
    if fn == "sqrtsoftplus":
        return jnp.sqrt(jax.nn.softplus(logits_TE))
    raise ValueError(f"MoEConfig.router_score_function={fn!r} is invalid: "
                     "must be one of ['softmax', 'sigmoid', 'sqrtsoftplus']")


def _order_keys(x: jax.Array) -> jax.Array:
    """Integers in the order of the floats `x` (the IEEE total order: -NaN < -inf < ... < -0 < +0 < ... <
    +inf < NaN, as `lax.top_k` compares), with the integer type's lowest value left free."""
    ity = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, ity)
    keys = jnp.where(bits < 0, bits ^ jnp.iinfo(ity).max, bits)  # negatives: flip the magnitude bits
    return jnp.maximum(keys, jnp.iinfo(ity).min + 1)


def top_k_indices(x: jax.Array, k: int) -> jax.Array:
    """`lax.top_k(x, k)[1]` over the last axis (int32; ties: the lower index first) as k rounds of a row
    argmax on order-preserving integer keys, each picked key then set below every other.

    For the router's small rows (E ≤ a few hundred, k ≤ 8) XLA makes a few row reductions of this; the
    group-limited choice through `lax.top_k` ran as two sorts per layer on the GPU (deepseek_small's
    profile, 2026-12-07). `bench_ops.py --only top-k` times both.
    """
    if not 0 < k <= x.shape[-1]:
        raise ValueError(f"top-{k} of rows of {x.shape[-1]}")
    keys = _order_keys(x)
    taken = jnp.iinfo(keys.dtype).min
    col = jax.lax.broadcasted_iota(jnp.int32, keys.shape, keys.ndim - 1)
    picked = []
    for _ in range(k):
        i = jnp.argmax(keys, axis=-1).astype(jnp.int32)
        picked.append(i)
        keys = jnp.where(col == i[..., None], taken, keys)
    return jnp.stack(picked, axis=-1)


def group_limited_topk(sel_TE: jax.Array, k: int, num_groups: int, group_topk: int,
                       score_topk: int | None = None, select=top_k_indices) -> jax.Array:
    """Top-k experts restricted to the `group_topk` best of `num_groups` contiguous expert groups.

    A group's score is the sum of its top `score_topk` selection scores (default k // group_topk, as
    Megatron; DeepSeek-V3: 2; DeepSeek-V2: 1, its best expert). Returns [T,k] int32. `select(x, k)`:
    the top-k indices of rows, best first (`top_k_indices`; the benchmark passes `lax.top_k`'s).
    """
    T, E = sel_TE.shape
    per_group = sel_TE.reshape(T, num_groups, E // num_groups)
    best_in_group = select(per_group, score_topk or k // group_topk)      # [T, G, s], best first
    group_score_TG = jnp.take_along_axis(per_group, best_in_group, axis=-1).sum(-1)
    best_groups = select(group_score_TG, group_topk)                      # [T, group_topk]
    group_ok_TG = jax.nn.one_hot(best_groups, num_groups, dtype=jnp.bool_).any(axis=-2)
    expert_ok_TE = jnp.repeat(group_ok_TG, E // num_groups, axis=-1)
    masked = jnp.where(expert_ok_TE, sel_TE, -jnp.inf)
    return select(masked, k).astype(jnp.int32)


def topk_experts(sel_TE: jax.Array, cfg: MoEConfig) -> jax.Array:
    """Chosen experts [T,k] from selection scores (plain or group-limited top-k)."""
    sel_TE = jax.lax.stop_gradient(sel_TE)
    if cfg.router_num_groups is not None:
        return group_limited_topk(sel_TE, cfg.router_topk, cfg.router_num_groups,
                                  cfg.router_group_topk, cfg.group_score_topk)
    return top_k_indices(sel_TE, cfg.router_topk)


def gates(logits_TE: jax.Array, cfg: MoEConfig, expert_bias=None) -> tuple[jax.Array, jax.Array]:
    """(weights[T,k], experts[T,k]) before capacity. The bias only steers the choice."""
    fn, k = cfg.router_score_function, cfg.router_topk
    bias = 0.0 if expert_bias is None else expert_bias.astype(logits_TE.dtype)[None, :]
    if fn == "softmax" and cfg.router_pre_softmax:
        probs_TE = jax.nn.softmax(logits_TE, axis=-1)
        experts = topk_experts(probs_TE + bias, cfg)
        weights = jnp.take_along_axis(probs_TE, experts, axis=-1)
    elif fn == "softmax":
        experts = topk_experts(logits_TE + bias, cfg)
        weights = jax.nn.softmax(jnp.take_along_axis(logits_TE, experts, axis=-1), axis=-1)
    else:
        scores_TE = score(logits_TE, fn)
        experts = topk_experts(scores_TE + bias, cfg)
        weights = jnp.take_along_axis(scores_TE, experts, axis=-1)
        if k > 1:
            weights = weights / (weights.sum(-1, keepdims=True) + _EPS)
    if cfg.router_topk_scaling_factor is not None:
        weights = weights * cfg.router_topk_scaling_factor
    return weights, experts


def expert_counts(experts_Tk: jax.Array, num_experts: int, mask_Tk=None) -> jax.Array:
    """Assignments per expert [E] int32 (only where mask is True, if given)."""
    ones = jnp.ones(experts_Tk.shape, jnp.int32) if mask_Tk is None else mask_Tk.astype(jnp.int32)
    return jnp.zeros((num_experts,), jnp.int32).at[experts_Tk.reshape(-1)].add(ones.reshape(-1))


def capacity_mask(weights_Tk: jax.Array, experts_Tk: jax.Array, num_experts: int, cap: int,
                  policy: str) -> jax.Array:
    """[T,k] bool: keep at most `cap` assignments per expert.

    policy "probs" keeps the highest weights (ties: earlier token), "position" the earliest tokens.
    Sort-based: rank each assignment within its expert, no [T,E] intermediate.
    """
    T, k = experts_Tk.shape
    e = experts_Tk.reshape(-1)
    token = jnp.arange(T * k, dtype=jnp.int32) // k
    if policy == "probs":
        w = jax.lax.stop_gradient(weights_Tk).reshape(-1)
        order = jnp.lexsort((token, -w, e))          # last key is primary
    elif policy == "position":
        order = jnp.lexsort((token, e))
    else:
        raise ValueError(f"MoEConfig.token_drop_policy={policy!r} is invalid: "
                         "must be one of ['probs', 'position']")
    counts = expert_counts(experts_Tk, num_experts)
    start_E = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(T * k, dtype=jnp.int32) - start_E[e[order]]
    rank = jnp.zeros((T * k,), jnp.int32).at[order].set(rank_sorted)
    return (rank < cap).reshape(T, k)


def _aux_scores(logits_TE: jax.Array, fn: str) -> jax.Array:
    """Scores the balancing losses use: softmax over E, or sigmoid-like scores normalised over E."""
    s = score(logits_TE, fn)
    if fn != "softmax":
        s = s / (s.sum(-1, keepdims=True) + _EPS)
    return s


def aux_loss(scores_TE: jax.Array, counts_E: jax.Array, coeff: float) -> jax.Array:
    """Switch-style balancing loss coeff·E·Σ f_i·P_i, f_i = count_i / Σcount (= T·k pre-drop)."""
    counts = jax.lax.stop_gradient(counts_E).astype(scores_TE.dtype)
    f_E = counts / counts.sum()
    return coeff * scores_TE.shape[-1] * jnp.sum(f_E * scores_TE.mean(0))


def seq_aux_loss(scores_TE: jax.Array, experts_Tk: jax.Array, seq_len: int | None,
                 coeff: float) -> jax.Array:
    """`aux_loss` computed per sequence (tokens are [T/seq_len, seq_len] row-major) and averaged."""
    T, E = scores_TE.shape
    if seq_len is None or seq_len <= 0 or T % seq_len:
        raise ValueError(f"router_load_balancing_type='seq_aux_loss' needs seq_len dividing the "
                         f"number of tokens T={T} (got seq_len={seq_len!r})")
    B = T // seq_len
    counts_BE = jax.vmap(expert_counts, (0, None))(experts_Tk.reshape(B, seq_len, -1), E)
    scores_BSE = scores_TE.reshape(B, seq_len, E)
    per_seq = jax.vmap(aux_loss, (0, 0, None))(scores_BSE, counts_BE, coeff)
    return per_seq.mean()


def global_aux_loss(scores_TE: jax.Array, counts_E: jax.Array, coeff: float,
                    axis_names=()) -> jax.Array:
    """`aux_loss` with f_i from the counts psum-ed over `axis_names` (inside shard_map).

    P_i stays the local mean, so the mean of this value over the shards equals the full-batch
    aux_loss (equal shard sizes). With no axis_names it is plain aux_loss: under jit/GSPMD the token
    array is already global.
    """
    if axis_names:
        counts_E = jax.lax.psum(jax.lax.stop_gradient(counts_E), tuple(axis_names))
    return aux_loss(scores_TE, counts_E, coeff)


def z_loss(logits_TE: jax.Array, coeff: float) -> jax.Array:
    """coeff · mean over tokens of logsumexp(logits)²."""
    return coeff * jnp.mean(jnp.square(jax.nn.logsumexp(logits_TE, axis=-1)))


def route(logits_TE: jax.Array, cfg: MoEConfig, *, expert_bias=None, rng=None, seq_len=None,
          axis_names=()) -> Routing:
    """Route T tokens: top-k experts, gate weights, capacity dropping, losses.

    expert_bias[E]: added to the selection scores only (aux-loss-free balancing).
    rng: key for router_force_load_balancing (a fixed key if None).
    seq_len: sequence length for seq_aux_loss. axis_names: shard_map axes for global_aux_loss.
    """
    dtype = router_dtype(cfg)
    logits_TE = logits_TE.astype(dtype)
    T, E = logits_TE.shape
    if E != cfg.num_experts:
        raise ValueError(f"logits have {E} experts but MoEConfig.num_experts={cfg.num_experts}")
    losses = {}
    if cfg.z_loss_coeff is not None:
        losses["z_loss"] = z_loss(logits_TE, cfg.z_loss_coeff)
    if cfg.router_force_load_balancing:
        key = jax.random.key(0) if rng is None else rng
        logits_TE = jax.random.normal(key, logits_TE.shape, dtype)

    weights, experts = gates(logits_TE, cfg, expert_bias)
    routed_counts = expert_counts(experts, E)

    lb = cfg.router_load_balancing_type
    if lb != "none":
        scores_TE = _aux_scores(logits_TE, cfg.router_score_function)
        c = cfg.aux_loss_coeff
        if lb == "aux_loss":
            losses[lb] = aux_loss(scores_TE, routed_counts, c)
        elif lb == "seq_aux_loss":
            losses[lb] = seq_aux_loss(scores_TE, experts, seq_len, c)
        elif lb == "global_aux_loss":
            losses[lb] = global_aux_loss(scores_TE, routed_counts, c, axis_names)
        else:
            raise ValueError(f"MoEConfig.router_load_balancing_type={lb!r} is invalid: must be one "
                             "of ['aux_loss', 'seq_aux_loss', 'global_aux_loss', 'none']")

    cap = capacity(T, cfg)
    if cap is None:
        kept = jnp.ones(experts.shape, jnp.bool_)
        tokens_per_expert, dropped = routed_counts, jnp.zeros((), jnp.int32)
    else:
        kept = capacity_mask(weights, experts, E, cap, cfg.token_drop_policy)
        weights = jnp.where(kept, weights, jnp.zeros((), weights.dtype))
        tokens_per_expert = expert_counts(experts, E, kept)
        dropped = (T * cfg.router_topk - kept.sum()).astype(jnp.int32)
    assignment = Assignment(weights=weights, experts=experts, kept=kept,
                            tokens_per_expert=tokens_per_expert)
    return Routing(assignment=assignment, dropped=dropped, losses=losses, routed_counts=routed_counts)


def update_expert_bias(bias_E: jax.Array, tokens_per_expert_E: jax.Array, rate: float) -> jax.Array:
    """Aux-loss-free balancing step: bias += rate · sign(mean(count) − count), over the last axis
    (leading axes: independent layers)."""
    counts = tokens_per_expert_E.astype(jnp.float32)
    delta = rate * jnp.sign(counts.mean(-1, keepdims=True) - counts)
    return (bias_E + delta.astype(bias_E.dtype)).astype(bias_E.dtype)

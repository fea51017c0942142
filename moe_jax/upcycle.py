"""Dense → MoE upcycling (granular, following arXiv 2410.07524 and Megatron-Core's upcycling).

Every routed expert starts from a slice of the dense MLP. With `G = dense ffn / moe ffn` (the
granularity) the dense hidden units split into G contiguous slices — gate and up halves of a gated
MLP alike — and expert `e` takes slice `e % G` (round-robin), so each run of G consecutive experts
(a *virtual group*) holds the whole dense MLP. Attention, norms, embeddings and dense layers are
copied; the optimizer state starts fresh.

Why the output matches at step 0. An MLP is a sum over its hidden units, so
`MLP(x) = Σ_s MLP_s(x)` over the G slices, exactly, for any activation. An MoE layer returns
`Σ_{chosen e} w_e · c · MLP_{e % G}(x)` with expert outputs scaled by c. It equals the dense MLP when
every slice's chosen weights add up to the same 1/c for every token:

* weights of the k chosen experts sum to 1 (post-softmax — softmax over the chosen logits, Mixtral —
  or sigmoid-like scores normalised over k > 1): give all experts of a virtual group the same router
  row (random across groups). Ties are whole groups, so top-k (k a multiple of G) picks k/G whole
  groups and each slice's weights sum to 1/G: **c = G** (/ `router_topk_scaling_factor`).
* weights not normalised over the chosen k (pre-softmax: softmax over all E, then top-k; or one
  sigmoid score): only a zero router makes them token-independent. All logits tie, top-k takes
  experts 0..k-1 (k/G copies of each slice) with weight 1/E each (pre-softmax), so each slice gets
  (k/G)/E: **c = E·G/k**. With Megatron's counting of experts before splitting (E₀ = E/G) that is its
  `E₀·G²/k`. For a sigmoid score with k = 1: c = 1/sigmoid(0) = 2.

Where c goes: `scale="exact"` (default) multiplies fc2 by c — exact for every activation.
`scale="megatron"` follows Megatron-Core's `upcycling_utils`: gate, up and fc2 of a gated MLP each ×
c^(1/3); fc1 and fc2 × c^(1/3) for squared ReLU (degree-2 homogeneous, so exact), × c^(1/2) otherwise —
for SwiGLU/GeLU the step-0 output is then close, not equal (silu(c·z) ≠ c·silu(z)).
Router rows are shared within a virtual group as in Megatron (which keeps random rows with
pre-softmax too, so its pre-softmax upcycling is not exact at step 0; here the router is zero then).
Exactness also needs k % G == 0, dropless routing (no capacity) and no group-limited routing;
`plan()` reports whether the configuration is exact.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.layers import GATED
from moe_jax.model import GPT, stack_layers, unstack_layers

# ModelConfig fields that may differ between the dense source and the MoE target.
FREE_FIELDS = ("moe", "dtype", "param_dtype", "remat", "attention_impl", "fused_kernels", "init_std")


@dataclasses.dataclass(frozen=True)
class Plan:
    granularity: int      # G: slices of the dense FFN
    scale: float          # c: total factor on each expert's output
    router_init: str      # "virtual_group" | "zero"
    exact: bool           # whether step-0 outputs equal the dense model's (up to rounding)
    why_not_exact: str    # "" when exact


def plan(dense: ModelConfig, moe: ModelConfig, scale_mode: str = "exact") -> Plan:
    """Check that `moe` can be upcycled from `dense`; the granularity, weight scale and router init."""
    if dense.moe is not None:
        raise ValueError("upcycle: the source model already has MoE layers (ModelConfig.moe is set)")
    m = moe.moe
    if m is None:
        raise ValueError("upcycle: the target ModelConfig.moe is None; give an MoE config")
    for f in dataclasses.fields(ModelConfig):
        if f.name not in FREE_FIELDS and getattr(dense, f.name) != getattr(moe, f.name):
            raise ValueError(f"upcycle: ModelConfig.{f.name} differs: dense {getattr(dense, f.name)!r} "
                             f"vs MoE {getattr(moe, f.name)!r} (only {list(FREE_FIELDS)} may differ)")
    if m.activation != dense.activation:
        raise ValueError(f"upcycle: MoEConfig.activation={m.activation!r} must equal the dense "
                         f"activation {dense.activation!r}")
    if m.shared_expert_intermediate_size:
        raise ValueError("upcycle: MoEConfig.shared_expert_intermediate_size is set; upcycling into "
                         "shared experts is not supported (set it to null)")
    if scale_mode not in ("exact", "megatron"):
        raise ValueError(f"upcycle: scale={scale_mode!r} is invalid: must be 'exact' or 'megatron'")
    F, f, E, k = dense.ffn_hidden_size, m.ffn_hidden_size, m.num_experts, m.router_topk
    if F % f:
        raise ValueError(f"upcycle: MoEConfig.ffn_hidden_size={f} must divide the dense "
                         f"ffn_hidden_size={F} (granularity = dense / moe)")
    G = F // f
    if E % G:
        raise ValueError(f"upcycle: MoEConfig.num_experts={E} must be a multiple of the granularity "
                         f"G={G} (= {F}/{f}) so every expert slice appears equally often")
    s = m.router_topk_scaling_factor or 1.0
    fn = m.router_score_function
    normalised = (fn == "softmax" and not m.router_pre_softmax) or (fn != "softmax" and k > 1)
    if normalised:
        router_init, c = "virtual_group", G / s
    else:
        w0 = 1.0 / E if fn == "softmax" else (0.5 if fn == "sigmoid" else math.sqrt(math.log(2.0)))
        router_init, c = "zero", 1.0 / ((k / G) * w0 * s)
    why = []
    if k % G:
        why.append(f"router_topk={k} is not a multiple of the granularity {G}")
    if m.expert_capacity_factor is not None:
        why.append("expert_capacity_factor drops tokens")
    if m.router_num_groups is not None:
        why.append("group-limited routing (router_num_groups)")
    if m.router_force_load_balancing:
        why.append("router_force_load_balancing routes randomly")
    if scale_mode == "megatron" and m.activation != "squared_relu":
        why.append(f"scale='megatron' spreads c over fc1 and fc2, exact only for a positively "
                   f"homogeneous activation (squared_relu), not {m.activation}")
    return Plan(G, c, router_init, not why, "; ".join(why))


def _slices(w1_DnF, w2_FD, G: int, E: int):
    """Expert e gets dense hidden slice e % G: ([E, D, n, f], [E, f, D])."""
    f = w2_FD.shape[0] // G
    idx = jnp.arange(E) % G
    w1 = w1_DnF.reshape(w1_DnF.shape[0], w1_DnF.shape[1], G, f)[:, :, idx].transpose(2, 0, 1, 3)
    w2 = w2_FD.reshape(G, f, -1)[idx]
    return w1, w2


def upcycle_params(dense_params: dict, dense: ModelConfig, moe: ModelConfig, moe_params: dict, *,
                   scale_mode: str = "exact", seed: int = 0) -> dict:
    """Fill `moe_params` from `dense_params`; returns it. Both are pure dicts of GPT states in the
    per-layer view (`model.unstack_layers`: `blocks: {i: layer}`)."""
    p = plan(dense, moe, scale_mode)
    key = jax.random.key(seed)
    out = dict(moe_params)
    for name, v in dense_params.items():
        if name not in ("blocks", "mtp"):
            out[name] = v
    for i in range(moe.num_layers):
        dst = _upcycle_block(dense_params["blocks"][i], out["blocks"][i], moe, p, moe.is_moe_layer(i),
                             jax.random.fold_in(key, i), scale_mode)
        out["blocks"] = {**out["blocks"], i: dst}
    if moe.mtp_num_layers:  # each MTP module's block: MoE when the last layer is
        mtp = dict(out["mtp"])
        for k in range(moe.mtp_num_layers):
            src, module = dense_params["mtp"][k], dict(mtp[k])
            module.update({n: v for n, v in src.items() if n != "block"})
            module["block"] = _upcycle_block(src["block"], module["block"], moe, p,
                                             moe.is_moe_layer(moe.num_layers - 1),
                                             jax.random.fold_in(key, moe.num_layers + k), scale_mode)
            mtp[k] = module
        out["mtp"] = mtp
    return out


def _upcycle_block(src: dict, dst: dict, moe: ModelConfig, p: Plan, is_moe: bool, key, scale_mode: str) -> dict:
    """One block's pure dict: attention and norms copied, the MLP sliced into experts when `is_moe`."""
    m, G, c = moe.moe, p.granularity, p.scale
    gated = m.activation in GATED
    dst = dict(dst)
    for name, v in src.items():
        if name != "mlp" or not is_moe:
            dst[name] = v
    if is_moe:
        w1, w2 = _slices(src["mlp"]["w1_DnF"], src["mlp"]["w2_FD"], G, m.num_experts)
        if scale_mode == "exact":
            w2 = w2 * c
        elif gated or m.activation == "squared_relu":  # 3 factors of c^(1/3) (relu² is degree 2)
            w1, w2 = w1 * c ** (1 / 3), w2 * c ** (1 / 3)
        else:
            w1, w2 = w1 * c ** 0.5, w2 * c ** 0.5
        mlp = dict(dst["mlp"])
        mlp["experts"] = dict(mlp["experts"], w1_EDnF=w1, w2_EFD=w2)
        w_DE = mlp["router"]["w_DE"]
        if p.router_init == "zero":
            router = jnp.zeros_like(w_DE)
        else:  # one random row per virtual group, shared by its G experts
            base = moe.init_std * jax.random.normal(key, (w_DE.shape[0], m.num_experts // G), w_DE.dtype)
            router = jnp.repeat(base, G, axis=1)
        mlp["router"] = dict(mlp["router"], w_DE=router)
        dst["mlp"] = mlp
    return dst


def _check_same_shapes(a: dict, b: dict, path: str = "") -> None:
    for k in b:
        if k not in a:
            raise ValueError(f"upcycle: {path}{k} missing from the upcycled state")
        if isinstance(b[k], dict):
            _check_same_shapes(a[k], b[k], f"{path}{k}/")
        elif tuple(a[k].shape) != tuple(b[k].shape):
            raise ValueError(f"upcycle: {path}{k} has shape {tuple(a[k].shape)}, expected {tuple(b[k].shape)}")


def upcycle(dense_model: GPT, moe_cfg: ModelConfig, *, scale_mode: str = "exact", seed: int = 0) -> GPT:
    """A new MoE GPT(moe_cfg) whose step-0 function matches `dense_model` (see `plan`)."""
    dense_cfg = dense_model.cfg
    plan(dense_cfg, moe_cfg, scale_mode)
    model = GPT(moe_cfg, rngs=nnx.Rngs(seed))
    state = nnx.state(model)
    pure = unstack_layers(state.to_pure_dict(), moe_cfg)   # per-layer `blocks` views
    dense = unstack_layers(nnx.state(dense_model, nnx.Param).to_pure_dict(), dense_cfg)
    new = upcycle_params(dense, dense_cfg, moe_cfg, pure, scale_mode=scale_mode, seed=seed)
    _check_same_shapes(new, pure)
    new = jax.tree.map(lambda x, ref: jnp.asarray(x, ref.dtype), new, pure)
    state.replace_by_pure_dict(stack_layers(new, moe_cfg))
    nnx.update(model, state)
    return model

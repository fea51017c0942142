"""Device mesh, logical-axis rules, MoE parallel folding and sharding helpers.

One set of devices, two views of it (Megatron's *MoE parallel folding*):

- the dense mesh `(data, fsdp, tensor)` for embedding, attention, dense MLPs and the LM head;
- the MoE mesh `(edata, expert, etensor)` for the routed experts: the same devices in the same order,
  reshaped. `expert * etensor` need not divide `fsdp * tensor`, so EP can span devices that the dense
  layers use for TP or DP (e.g. 8 GPUs as TP=8 for attention and EP=8 for the experts).

Parameters carry logical axis names (`nnx.Param(..., logical_axes=(...))`); `RULES` maps each name to
mesh axes, and the name set decides the mesh (`exp`, `embed_moe`, `mlp_moe` → MoE mesh).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe_jax.config import ModelConfig, ParallelConfig

DENSE_AXES = ("data", "fsdp", "tensor")
MOE_AXES = ("edata", "expert", "etensor")

# Logical name -> mesh axis (or tuple of axes, or None = replicated). Parameters and activations.
RULES: dict[str, Any] = {
    # dense parameters (dense mesh): FSDP over the model dim, TP over heads / hidden / vocab
    "vocab": "tensor", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
    "norm": None, "layers": None,  # "layers": the leading axis of stacked (scanned) layers
    "q_lora": None, "kv_lora": None,  # MLA's low-rank latents: small, kept whole
    # routed-expert parameters (MoE mesh): EP over experts, ETP over the expert hidden dim
    "exp": "expert", "embed_moe": None, "mlp_moe": "etensor",
    # activations
    "act_batch": ("data", "fsdp"),          # [B, ...] on the dense mesh
    "act_tokens_moe": ("edata", "expert"),  # [T, ...] tokens inside the MoE layer
}
MOE_NAMES = frozenset({"exp", "embed_moe", "mlp_moe", "act_tokens_moe"})


@dataclasses.dataclass(frozen=True)
class Layout:
    """Resolved axis sizes and the two meshes over the same devices."""

    mesh: Mesh       # (data, fsdp, tensor)
    moe_mesh: Mesh   # (edata, expert, etensor)

    @property
    def sizes(self) -> dict[str, int]:
        return {**dict(self.mesh.shape), **dict(self.moe_mesh.shape)}

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def batch_shards(self) -> int:
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    @property
    def token_shards(self) -> int:
        return self.moe_mesh.shape["edata"] * self.moe_mesh.shape["expert"]

    def describe(self) -> str:
        s = self.sizes
        return (f"{self.num_devices} devices | dense data={s['data']} fsdp={s['fsdp']} "
                f"tensor={s['tensor']} | MoE edata={s['edata']} expert={s['expert']} "
                f"etensor={s['etensor']}")


def _err(field: str, value, why: str) -> ValueError:
    return ValueError(f"ParallelConfig.{field}={value!r} is invalid: {why}")


def resolve_sizes(pc: ParallelConfig, num_devices: int) -> dict[str, int]:
    """Axis sizes with the -1 axis filled; checks the products against the device count."""
    dense = {"data": pc.data, "fsdp": pc.fsdp, "tensor": pc.tensor}
    fixed = math.prod(v for v in dense.values() if v != -1)
    for name, v in dense.items():
        if v == -1:
            if num_devices % fixed:
                raise _err(name, -1, f"cannot fill: {num_devices} devices are not divisible by the "
                           f"other dense axes' product {fixed}")
            dense[name] = num_devices // fixed
    if math.prod(dense.values()) != num_devices:
        raise ValueError(f"ParallelConfig: data*fsdp*tensor = {dense['data']}*{dense['fsdp']}*"
                         f"{dense['tensor']} = {math.prod(dense.values())} must equal the device "
                         f"count {num_devices} (use -1 on one axis to fill)")
    ep, etp = pc.expert, pc.expert_tensor
    if ep == -1:  # fill: every device not used for ETP is an expert shard
        if num_devices % etp:
            raise _err("expert", -1, f"cannot fill: {num_devices} devices not divisible by "
                       f"expert_tensor={etp}")
        ep = num_devices // etp
    if num_devices % (ep * etp):
        raise ValueError(f"ParallelConfig: expert*expert_tensor = {ep}*{etp} must divide the device "
                         f"count {num_devices} (MoE layers fold the same devices as "
                         f"expert-data x expert x expert-tensor)")
    return {**dense, "edata": num_devices // (ep * etp), "expert": ep, "etensor": etp}


def check_layout(sizes: dict[str, int], model: ModelConfig | None = None,
                 batch_size: int | None = None, seq_len: int | None = None) -> None:
    """Fail with a clear ValueError on a layout the model or batch cannot use (before any compile)."""
    tp, fsdp, ep, etp = sizes["tensor"], sizes["fsdp"], sizes["expert"], sizes["etensor"]
    if model is not None:
        if model.num_heads % tp:
            raise _err("tensor", tp, f"must divide num_heads ({model.num_heads})")
        if model.num_kv_heads % tp and model.attention_type == "gqa":
            raise _err("tensor", tp, f"must divide num_kv_heads ({model.num_kv_heads})")
        if model.ffn_hidden_size % tp and any(not model.is_moe_layer(i)
                                              for i in range(model.num_layers)):
            raise _err("tensor", tp, f"must divide ffn_hidden_size ({model.ffn_hidden_size})")
        if model.vocab_size % tp:
            raise _err("tensor", tp, f"must divide vocab_size ({model.vocab_size})")
        if model.d_model % fsdp:
            raise _err("fsdp", fsdp, f"must divide d_model ({model.d_model})")
        m = model.moe
        if m is not None:
            if m.num_experts % ep:
                raise _err("expert", ep, f"must divide num_experts ({m.num_experts})")
            if m.ffn_hidden_size % etp:
                raise _err("expert_tensor", etp, f"must divide moe.ffn_hidden_size ({m.ffn_hidden_size})")
            if m.shared_size and m.shared_size % tp:
                raise _err("tensor", tp, f"must divide shared_expert_intermediate_size ({m.shared_size})")
            from moe_jax.ep import check  # the EP runner imports this module
            check(m.dispatcher, ep)
    if batch_size is not None:
        shards = sizes["data"] * sizes["fsdp"]
        if batch_size % shards:
            raise ValueError(f"TrainConfig.batch_size={batch_size} is invalid: must be divisible by "
                             f"data*fsdp = {shards}")
        if seq_len is not None:
            chunks = model.moe.dispatcher.overlap_chunks if model is not None and model.moe else 1
            tok = sizes["edata"] * sizes["expert"] * chunks
            if (batch_size * seq_len) % tok:
                raise ValueError(f"tokens per step {batch_size}*{seq_len} must be divisible by "
                                 f"edata*expert*overlap_chunks = {tok}")


def make_layout(pc: ParallelConfig = ParallelConfig(), model: ModelConfig | None = None, *,
                devices: Sequence | None = None, batch_size: int | None = None,
                seq_len: int | None = None) -> Layout:
    """Build (and validate) both meshes over `devices` (default: all devices of all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_sizes(pc, len(devices))
    check_layout(sizes, model, batch_size, seq_len)
    arr = np.asarray(devices, dtype=object)
    mesh = Mesh(arr.reshape([sizes[a] for a in DENSE_AXES]), DENSE_AXES)
    moe_mesh = Mesh(arr.reshape([sizes[a] for a in MOE_AXES]), MOE_AXES)
    return Layout(mesh=mesh, moe_mesh=moe_mesh)


def check_no_active_mesh(where: str) -> None:
    """Called where no layout was given: an active mesh (`jax.set_mesh`) outside shard_map would
    otherwise be silently ignored by the layers that shard by their layout."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1 and not all(
            t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        raise ValueError(f"{where}: called under an active {mesh.size}-device mesh "
                         f"{dict(mesh.shape)} without a layout; pass layout=parallel.make_layout(...) "
                         "to shard across it (or call it outside the mesh for one device)")


# ------------------------------------------------------------------ logical names -> shardings
def spec(names: Sequence[str | None], rules: dict = RULES) -> P:
    """PartitionSpec for a tuple of logical names (a mesh axis is used at most once)."""
    used, out = set(), []
    for n in names:
        ax = rules.get(n) if n is not None else None
        axes = (ax,) if isinstance(ax, str) else tuple(ax or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def sharding(names: Sequence[str | None], layout: Layout, shape: Sequence[int] | None = None
             ) -> NamedSharding:
    """NamedSharding of logical names on the mesh they belong to (replicate dims that don't divide)."""
    is_moe = any(n in MOE_NAMES for n in names if n)
    mesh = layout.moe_mesh if is_moe else layout.mesh
    p = spec(names)
    if shape is not None:  # e.g. a kv_heads dim smaller than tensor: keep it whole rather than fail
        p = P(*[ax if ax is None or dim % _size(mesh, ax) == 0 else None
                for ax, dim in zip(tuple(p) + (None,) * (len(shape) - len(p)), shape)])
    return NamedSharding(mesh, p)


def _size(mesh: Mesh, ax) -> int:
    return math.prod(mesh.shape[a] for a in ((ax,) if isinstance(ax, str) else ax))


def replicated(layout: Layout) -> NamedSharding:
    return NamedSharding(layout.mesh, P())


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def tree_shardings(tree: Any, layout: Layout) -> Any:
    """Shardings for a pytree of nnx Variables / arrays (params, optimizer state, TrainState).

    A Variable with `logical_axes` metadata is sharded by the rules (optimizer moments inherit the
    metadata of their parameter, so they shard like it); everything else is replicated.
    """
    def one(x):
        axes = x.get_metadata().get("logical_axes") if _is_var(x) else None
        if axes is None:
            return replicated(layout)
        shape = x.shape if hasattr(x, "shape") else None
        return sharding(axes, layout, shape)
    return jax.tree.map(one, tree, is_leaf=_is_var)


def batch_sharding(layout: Layout) -> NamedSharding:
    """[B, S] batches: the batch dim over (data, fsdp)."""
    return NamedSharding(layout.mesh, spec(("act_batch", None)))


def constrain(x: jax.Array, names: Sequence[str | None], layout: Layout | None) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op without a layout."""
    if layout is None:
        return x
    return jax.lax.with_sharding_constraint(x, sharding(names, layout, x.shape))


def layout_for(cfg) -> Layout | None:
    """The layout a run uses: None on one device (plain jit). On CPU (fake test devices) only when
    `parallel.*` is set explicitly; on GPUs always (data=-1 fills the devices of all hosts)."""
    n = jax.device_count()
    explicit = cfg.parallel != ParallelConfig()
    if n == 1 or (not explicit and jax.devices()[0].platform == "cpu"):
        return None
    tc = cfg.train
    sizes, micro = resolve_sizes(cfg.parallel, n), tc.batch_size // tc.grad_accum
    shards = sizes["data"] * sizes["fsdp"]
    if tc.grad_accum > 1 and micro % shards:  # name what the user set, not the micro-batch
        raise ValueError(f"TrainConfig.batch_size={tc.batch_size} is invalid with grad_accum={tc.grad_accum}: "
                         f"each micro-batch (batch_size/grad_accum = {micro}) must be divisible by "
                         f"data*fsdp = {shards}; use a batch_size that is a multiple of "
                         f"{shards * tc.grad_accum}, or a smaller grad_accum")
    return make_layout(cfg.parallel, cfg.model, batch_size=micro, seq_len=tc.seq_len)


def put_batch(batch: dict, layout: Layout) -> dict:
    """Place a host batch (the same global batch on every host) in its shards; one code path for 1 and
    N hosts: each process only materialises the slices its devices hold."""
    s = batch_sharding(layout)
    return {k: jax.make_array_from_callback(v.shape, s, lambda idx, v=v: v[idx])
            for k, v in batch.items()}


def pin_batch(x: jax.Array, layout: Layout | None) -> jax.Array:
    """Pin an activation [B, ...] to the batch sharding when the dense mesh has TP: the MoE mesh
    splits tokens over devices that TP replicates, and without the pin XLA may replicate whole
    tensors to switch meshes. A no-op otherwise (where the two layouts already agree)."""
    if layout is None or layout.mesh.shape["tensor"] == 1:
        return x
    return constrain(x, ("act_batch",) + (None,) * (x.ndim - 1), layout)

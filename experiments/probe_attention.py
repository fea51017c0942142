"""Causal attention kernels at the benchmark shapes, GPU time by a profiler trace (a probe, not a benchmark).

  PYTHONPATH=. python experiments/probe_attention.py [--out FILE]

Times, forward and forward+backward, `[B=8, S=2048, H=16, Hkv=4, hd=128]` bf16 (mixtral_small and
deepseek_small's attention): what the model runs (`jax.nn.dot_product_attention`, cuDNN flash through
XLA), JAX's own Mosaic GPU flash-attention example (`jax.experimental.pallas.ops.gpu.attention_mgpu`,
float16, forward only: its backward lacks causal masking; read as a measure of the headroom a hand-written
kernel could have, not used by the library), and PyTorch's SDPA (flash and cuDNN backends) in the same
process. TFLOP/s count the causal half: 4·B·H·S²·hd/2 forward, 2.5× that for the backward.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in this process
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from timing import device_ms, write_result  # noqa: E402

B, S, H, KV, HD = 8, 2048, 16, 4, 128
FWD_FLOP = 4 * B * H * S * S * HD / 2


def _row(name, fwd_ms, both_ms):
    bwd = None if both_ms is None or fwd_ms is None else both_ms - fwd_ms
    tf = lambda flop, ms: None if ms is None else flop / ms / 1e9  # noqa: E731
    r = dict(kernel=name, fwd_ms=fwd_ms, fwd_bwd_ms=both_ms, fwd_tflops=tf(FWD_FLOP, fwd_ms),
             bwd_tflops=tf(2.5 * FWD_FLOP, bwd))
    fmt = lambda v: "-" if v is None else f"{v:7.3f}"  # noqa: E731
    print(f"{name:<34} fwd {fmt(fwd_ms)} ms {fmt(r['fwd_tflops'])} TF/s | fwd+bwd {fmt(both_ms)} ms "
          f"| bwd {fmt(r['bwd_tflops'])} TF/s", flush=True)
    return r


def _jax_rows(q, k, v, ct):
    rows = []

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    def both(f):
        return jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](ct))

    rows.append(_row("jax cudnn (the model's)", device_ms(jax.jit(cudnn), q, k, v),
                     device_ms(both(cudnn), q, k, v)))
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as am
    except ImportError as e:  # the example moved or is missing in this JAX
        print(f"attention_mgpu: not importable ({e})")
        return rows
    h = [a.astype(jnp.float16) for a in (q, k, v)]  # the example's kernel writes float16 (JAX 0.11)
    for bq, bkv in ((64, 128), (64, 64), (128, 128)):
        try:
            cfg = am.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=2, causal=True)
            f = jax.jit(functools.partial(am.attention, config=cfg))
            err = float(jnp.max(jnp.abs(f(*h).astype(jnp.float32) - cudnn(q, k, v).astype(jnp.float32))))
            rows.append(_row(f"jax attention_mgpu fwd fp16 {bq}x{bkv}", device_ms(f, *h), None))
            rows[-1]["max_abs_diff_vs_cudnn"] = err
        except Exception as e:  # noqa: BLE001 (a config this JAX or GPU refuses: say which and go on)
            print(f"attention_mgpu {bq}x{bkv}: {type(e).__name__}: {str(e)[:200]}")
    return rows


def _torch_rows():
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        print(f"torch: not importable ({e})")
        return []
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda h: torch.randn(B, h, S, HD, device="cuda", dtype=torch.bfloat16, generator=g,  # noqa: E731
                               requires_grad=True)
    q, k, v = mk(H), mk(KV), mk(KV)
    do = torch.randn(B, H, S, HD, device="cuda", dtype=torch.bfloat16, generator=g)
    for name, be in (("torch sdpa flash", SDPBackend.FLASH_ATTENTION),
                     ("torch sdpa cudnn", SDPBackend.CUDNN_ATTENTION)):
        def fwd():
            with sdpa_kernel(be):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def both():
            fwd().backward(do)

        try:
            times = []
            for f in (fwd, both):
                for _ in range(3):
                    f()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(10):
                    f()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 10)
            rows.append(_row(name, *times))
        except Exception as e:  # noqa: BLE001
            print(f"{name}: {type(e).__name__}: {str(e)[:200]}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if jax.devices()[0].platform != "gpu":
        sys.exit("probe_attention: needs an NVIDIA GPU (cuDNN attention); found " + jax.devices()[0].platform)
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, S, H, HD), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, S, KV, HD), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, S, KV, HD), jnp.bfloat16)
    ct = jax.random.normal(ks[3], (B, S, H, HD), jnp.bfloat16)
    rows = _jax_rows(q, k, v, ct) + _torch_rows()
    path = write_result("probe_attention", "causal", dict(shape=dict(B=B, S=S, H=H, KV=KV, HD=HD), rows=rows),
                        args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Time checkpoint save / restore of a full train state (params + AdamW moments + step/RNG/bias state).

  PYTHONPATH=. python experiments/bench_checkpoint.py --config mixtral_small --dir /tmp/ckpt_bench \
      --out experiments/results/

Measures: the blocking part of an async save (until the arrays are on the host and training could go
on), the whole save (committed on disk), the fingerprint pass alone, and restore (with and without the
fingerprint check) into the same single-device layout. Writes one JSON with device and command.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from moe_jax import checkpoint as C  # noqa: E402
from moe_jax.presets import load_config  # noqa: E402
from moe_jax.model import GPT  # noqa: E402
from moe_jax.train import init_state  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out) if out is not None else None
    return out, time.perf_counter() - t0


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="mixtral_small")
    ap.add_argument("--dir", default="/tmp/moe_jax_ckpt_bench")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-fill-moments", dest="fill_moments", action="store_false",
                    help="keep the freshly initialised (all-zero, very compressible) AdamW moments")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)

    create = lambda: init_state(GPT(cfg.model, rngs=nnx.Rngs(0)), cfg.train)[1]  # noqa: E731
    state, t_init = timed(lambda: jax.jit(create)())
    print(f"state created in {t_init:.1f}s", flush=True)
    if args.fill_moments:  # AdamW moments as after training (random, incompressible), not zeros
        def fill(s):
            key = jax.random.key(1)
            noise = lambda x: x + 1e-3 * jax.random.normal(key, x.shape, x.dtype)  # noqa: E731
            opt = jax.tree.map(lambda x: noise(x) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                               s.opt_state)
            return s.replace(opt_state=opt)
        state = jax.jit(fill, donate_argnums=0)(state)
    flat = C.flatten(state)
    n_bytes = sum(x.size * x.dtype.itemsize for x in flat.values())
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    _, t_fp_first = timed(lambda: C.fingerprints(flat))
    _, t_fp = timed(lambda: C.fingerprints(flat))
    res = {"config": args.config, "overrides": args.overrides, "params": int(n_params),
           "state_bytes": int(n_bytes), "state_arrays": len(flat), "init_s": t_init,
           "fingerprint_s": t_fp, "fingerprint_first_call_s": t_fp_first, "runs": []}
    for r in range(args.repeats):
        d = root / f"run{r}"
        ck = C.Checkpointer(d, keep=1)
        state = state.replace(step=state.step + 1)
        _, t_block = timed(lambda: ck.save(state) and None)
        _, t_wait = timed(lambda: ck.wait())
        size = du(d)
        target = C.abstract_state(state)
        if r == args.repeats - 1:
            del state, flat  # restore into an empty device, as a resumed run does
        restored, t_restore_nv = timed(lambda: ck.restore(target, verify=False))
        del restored
        restored, t_restore_first = timed(lambda: ck.restore(target))  # + fingerprint compile
        del restored
        restored, t_restore = timed(lambda: ck.restore(target))
        del restored
        ck.close()
        run = {"save_blocking_s": t_block, "save_total_s": t_block + t_wait, "bytes_on_disk": size,
               "restore_verified_s": t_restore, "restore_verified_first_call_s": t_restore_first,
               "restore_unverified_s": t_restore_nv,
               "save_GBps": size / (t_block + t_wait) / 1e9, "restore_GBps": size / t_restore / 1e9}
        res["runs"].append(run)
        print(json.dumps(run), flush=True)
        shutil.rmtree(d, ignore_errors=True)
        write(res, args)
    write(res, args)
    return 0


def write(res: dict, args) -> None:
    dev = jax.devices()[0]
    stamp = datetime.datetime.now(datetime.timezone.utc)
    try:
        fs = subprocess.run(["df", "-h", str(Path(args.dir).parent)], capture_output=True, text=True).stdout
    except OSError:
        fs = None
    res.update(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
               orbax=__import__("orbax.checkpoint").checkpoint.__version__,
               date=stamp.isoformat(timespec="seconds"), checkpoint_dir=args.dir, filesystem=fs,
               command="python experiments/bench_checkpoint.py " + " ".join(sys.argv[1:]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"checkpoint_{args.config}_{stamp:%Y-%m-%d}_{dev.device_kind.replace(' ', '_')}.json"
    path.write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=2))
    print(f"-> {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

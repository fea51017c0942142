"""Upcycle a dense checkpoint into an MoE one that `experiments/train.py --resume` continues.

  python experiments/upcycle.py --dense runs/dense_small --config tiny_moe --out runs/upcycled \
      moe.num_experts=8 moe.router_topk=2 moe.ffn_hidden_size=1024 moe.layer_freq=1
  python experiments/upcycle.py --hf path/to/llama_dir --config tiny_moe --out runs/llama_moe ...
  python experiments/train.py --config runs/upcycled/config.yaml --resume

The model architecture comes from the dense checkpoint; the preset (and overrides) give the `moe`
and `train` sections (`model.*` overrides apply on top of the dense model, e.g. model.dtype).
Granularity G = dense ffn / moe.ffn_hidden_size. Prints the step-0 check: max |dense − MoE| logits on
a batch (≈0 for the exact settings; see moe_jax/upcycle.py for when the equivalence is exact).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import yaml  # noqa: E402

from moe_jax import runs  # noqa: E402
from moe_jax.checkpoint import Checkpointer, CheckpointError, quiet_failed_reads  # noqa: E402
from moe_jax.runs import load_model  # noqa: E402
from moe_jax.tokenizer import describe, load_tokenizer, run_tokenizer, run_tokenizer_meta, save_run_tokenizer  # noqa: E402
from moe_jax.presets import apply_overrides, build_config, load_raw, to_dict  # noqa: E402
from moe_jax.train import init_state  # noqa: E402
from moe_jax.upcycle import plan, upcycle  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--dense", help="our dense run dir (or its checkpoints/ folder)")
    src.add_argument("--hf", help="a local Hugging Face Llama/Mistral/Qwen2/Qwen3 directory")
    ap.add_argument("--step", type=int, default=None, help="dense checkpoint step (default: latest)")
    ap.add_argument("--config", default="tiny_moe", help="preset giving the moe and train sections")
    ap.add_argument("--out", required=True, help="output run dir (config.yaml + checkpoints/0)")
    ap.add_argument("--scale", default="exact", choices=["exact", "megatron"],
                    help="exact: expert fc2 x c; megatron: c^(1/3) on gate/up/fc2 (c^(1/2) ungated)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the router's virtual-group rows")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_args(argv)
    quiet_failed_reads()  # a damaged checkpoint: one error line, not thousands
    jax.config.update("jax_default_matmul_precision", "highest")

    out = Path(args.out)
    try:  # refused before any work, and nothing is written until the checkpoint is
        runs.check_out_dir(out, "--out")
        held = runs.checkpoint_steps(out)
        if held or (out / "config.yaml").exists():
            what = f"the checkpoints {held}" if held else "a run (config.yaml)"
            raise runs.RunDirError(f"--out {out} already holds {what}; choose a new --out")
        if args.dense:
            dense_cfg, dense = load_model(args.dense, args.step)
            dense_model_cfg = dense_cfg.model
        else:
            from moe_jax.convert.hf import load_hf
            dense_model_cfg, dense = load_hf(args.hf)
        raw = load_raw(args.config)
        raw["model"] = {k: v for k, v in dataclasses.asdict(dense_model_cfg).items() if k != "moe"}
        raw = apply_overrides(raw, list(args.overrides) + [f"train.out_dir={args.out}",
                                                           "train.checkpoint=true"])
        cfg = build_config(raw)
        p = plan(dense_model_cfg, cfg.model, args.scale)
        model = upcycle(dense, cfg.model, scale_mode=args.scale, seed=args.seed)
    except (ValueError, CheckpointError, FileNotFoundError, runs.RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    m = cfg.model.moe
    print(f"upcycle: G={p.granularity} ({dense_model_cfg.ffn_hidden_size}/{m.ffn_hidden_size}), "
          f"{m.num_experts} experts top-{m.router_topk}, MoE layers {list(cfg.model.moe_layers)}, "
          f"expert output scale c={p.scale:g} ({args.scale}), router init {p.router_init}")
    if not p.exact:
        print(f"upcycle: step-0 outputs will differ from the dense model: {p.why_not_exact}")

    seq = min(64, cfg.train.seq_len, cfg.model.max_seq_len)
    tokens = jax.random.randint(jax.random.key(0), (2, seq), 0, cfg.model.vocab_size)
    ref = dense(tokens)[0].astype(jnp.float32)
    got = model(tokens)[0].astype(jnp.float32)
    diff = float(jnp.max(jnp.abs(got - ref)))
    scale = float(jnp.max(jnp.abs(ref)))
    print(f"check: max |dense - upcycled| logits = {diff:.3e} (max |dense| = {scale:.3e}, "
          f"relative {diff / scale:.2e}) on a [2, {seq}] batch")

    _, state = init_state(model, cfg.train)  # fresh optimizer, step 0, data position 0
    try:
        with runs.RunLock.acquire(out, what="--out"):
            ck = Checkpointer(out / "checkpoints", keep=cfg.train.keep_checkpoints)
            try:
                ck.save(state, config=to_dict(cfg))
            finally:
                ck.close()
            (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            print(_keep_tokenizer(args, out))
    except (CheckpointError, runs.RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {ck.directory / '0'}; continue with:\n  python experiments/train.py "
          f"--config {out / 'config.yaml'} --resume [train.data=TOKENS.bin]")
    return 0


def _keep_tokenizer(args, out: Path) -> str:
    """The upcycled run keeps the dense model's tokenizer (the HF directory's tokenizer files, or the
    dense run's): a resume on data of another tokenizer is refused, generate/evaluate find it."""
    try:
        if args.hf:
            if not (Path(args.hf) / "tokenizer.json").is_file():
                return (f"tokenizer: none recorded ({args.hf} has no tokenizer.json); prepare the data with the "
                        f"tokenizer the checkpoint was trained with")
            tok = load_tokenizer(args.hf)
        else:
            dense_dir = Path(args.dense).parent if Path(args.dense).name == "checkpoints" else Path(args.dense)
            if run_tokenizer_meta(dense_dir) is None:
                return "tokenizer: the dense run records none (bytes or synthetic data)"
            tok = run_tokenizer(dense_dir)
    except (ValueError, ImportError) as e:
        return f"tokenizer: none recorded ({e})"
    save_run_tokenizer(out, tok)
    return (f"tokenizer: {describe(tok.meta())}, kept in {out / 'tokenizer'}; prepare data with "
            f"experiments/prepare_data.py ... --tokenizer {out / 'tokenizer'}")


if __name__ == "__main__":
    sys.exit(main())

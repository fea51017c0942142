"""Held-out loss and perplexity of a checkpoint on a token file.

  python experiments/evaluate.py --run runs/a                         # the run's validation split
  python experiments/evaluate.py --run runs/a --data other.bin --batches 50 --json eval.json
  python experiments/evaluate.py --hf path/to/hf_dir --data tokens.bin

The model runs at inference settings (no router jitter, dropless routing; `moe_jax.evaluate`).
Without --data: the validation split of the run's `train.data` (the tail `val_fraction` of the file,
as training evaluates it); with --data: windows drawn from the whole file, which must have been made
with the run's (or the HF directory's) tokenizer. Prints one line and a JSON line (--json: also a file).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_jax import compile_cache  # noqa: E402
from moe_jax.checkpoint import CheckpointError, quiet_failed_reads  # noqa: E402
from moe_jax.config import TrainConfig  # noqa: E402
from moe_jax.data import TokenDataset, make_dataset  # noqa: E402
from moe_jax.evaluate import evaluate, load_for_inference, make_eval_step  # noqa: E402
from moe_jax.tokenizer import check_same_tokenizer  # noqa: E402
from moe_jax.tokens import TokenFile, TokenFileError, token_paths  # noqa: E402
from moe_jax.train import split_model  # noqa: E402


def dataset(args, cfg, model, tok):
    """The batches to evaluate and a description of them."""
    mc = model.cfg
    tc = cfg.train if cfg is not None else TrainConfig(seq_len=min(256, mc.max_seq_len), data="none")
    seq_len = args.seq_len or tc.seq_len
    batch_size = args.batch_size or tc.batch_size
    if args.data is None:
        if cfg is None:
            raise ValueError("--hf needs --data (a token file made with the checkpoint's tokenizer)")
        tc = dataclasses.replace(tc, seq_len=seq_len, batch_size=batch_size)
        return make_dataset(tc, mc.vocab_size, split="val"), f"the validation split of {tc.data}"
    if not token_paths(args.data)[1].exists():
        raise TokenFileError(f"--data {args.data}: no token file there (make one with "
                             f"experiments/prepare_data.py)")
    f = TokenFile(args.data)
    owner = f"run {args.run}'s tokenizer" if args.run else f"{args.hf}'s tokenizer"
    check_same_tokenizer(tok.meta(), f.tokenizer_meta, f"--data {args.data}", owner)
    top = f.max_token()
    if top is not None and top >= mc.vocab_size:
        raise TokenFileError(f"--data {args.data} holds token id {top}, outside the model's vocab_size "
                             f"{mc.vocab_size}")
    return (TokenDataset(f, seq_len, batch_size, seed=args.seed, split="train", val_fraction=0.0),
            f"{f.bin_path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run directory (train.out_dir)")
    src.add_argument("--hf", help="a local Hugging Face checkpoint directory")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ap.add_argument("--data", default=None, help="token file (default: the run's validation split)")
    ap.add_argument("--batches", type=int, default=None, help="batches (default: train.eval_batches or 8)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the run's train.batch_size")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the run's train.seq_len")
    ap.add_argument("--seed", type=int, default=0, help="seed of the windows drawn from --data")
    ap.add_argument("--json", default=None, help="also write the result to this file")
    compile_cache.add_flag(ap)
    args = ap.parse_args(argv)
    compile_cache.enable(args.compile_cache)  # before the first compile
    quiet_failed_reads()
    try:
        if args.batches is not None and args.batches < 1:
            raise ValueError(f"--batches {args.batches} is invalid: must be >= 1")
        cfg, model, tok = load_for_inference(args.run, args.hf, args.step)
        data, what = dataset(args, cfg, model, tok)
        batches = args.batches or (cfg.train.eval_batches if cfg is not None else 8)
        _, params, rest = split_model(model)
        result = evaluate(make_eval_step(model.cfg), params, rest, data, batches, model.cfg)
    except (ValueError, CheckpointError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result.update(source=args.run or args.hf, data=what, batches=batches, batch_size=data.batch_size,
                  seq_len=data.seq_len, tokens=batches * data.batch_size * data.seq_len)
    extra = f" dropped {result['val_dropped']}" if "val_dropped" in result else ""
    print(f"eval: loss {result['val_loss']:.4f} ppl {result['val_ppl']:.2f}{extra} | {batches} batches x "
          f"{data.batch_size} x {data.seq_len} tokens of {what}")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

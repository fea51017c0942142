"""Sample text from a checkpoint with a key/value cache.

  python experiments/generate.py --run runs/tiny_moe --prompt "def main(" --max-new-tokens 200
  python experiments/generate.py --run runs/a --prompt "import" --temperature 0     # greedy
  python experiments/generate.py --hf path/to/hf_dir --prompt "Hello" --top-p 0.9 --seed 1

The prompt is encoded with the run's tokenizer (`<run>/tokenizer/`; bytes for runs on the embedded or
synthetic data) or the HF directory's; the model runs at inference settings (dropless routing, no
router jitter). Prints the prompt followed by the sampled text; sampling stops at the tokenizer's EOS.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_jax import compile_cache  # noqa: E402
from moe_jax.checkpoint import CheckpointError, quiet_failed_reads  # noqa: E402
from moe_jax.evaluate import load_for_inference  # noqa: E402
from moe_jax.generate import generate  # noqa: E402
from moe_jax.tokenizer import describe  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run directory (train.out_dir)")
    src.add_argument("--hf", help="a local Hugging Face checkpoint directory")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ap.add_argument("--prompt", required=True, help="text to continue")
    ap.add_argument("--max-new-tokens", type=int, default=100,
                    help="at most this many (fewer if the model's max_seq_len is reached first)")
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
    ap.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    compile_cache.add_flag(ap)
    args = ap.parse_args(argv)
    compile_cache.enable(args.compile_cache)  # before the first compile
    quiet_failed_reads()
    try:
        _, model, tok = load_for_inference(args.run, args.hf, args.step)
        ids = tok.encode(args.prompt)
        if ids.size == 0:
            raise ValueError(f"--prompt {args.prompt!r} encodes to no tokens; give some text")
        if ids.max() >= model.cfg.vocab_size:
            raise ValueError(f"--prompt: token id {int(ids.max())} of tokenizer {describe(tok.meta())} is "
                             f"outside the model's vocab_size={model.cfg.vocab_size}: the model was not "
                             f"trained with this tokenizer")
        room = model.cfg.max_seq_len - ids.size
        if room < 1:
            raise ValueError(f"--prompt is {ids.size} tokens, the model's max_seq_len={model.cfg.max_seq_len} "
                             f"leaves no room to generate; shorten it")
        n = min(args.max_new_tokens, room)
        t0 = time.perf_counter()
        new = generate(model, ids, n, temperature=args.temperature, top_p=args.top_p, rng=args.seed,
                       eos_id=tok.eos_id, vocab_limit=min(tok.vocab_size, model.cfg.vocab_size))[0]
        dt = time.perf_counter() - t0
    except (ValueError, CheckpointError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(args.prompt + tok.decode(new))
    print(f"[{len(new)} tokens in {dt:.2f} s ({len(new) / dt:.1f} tok/s, compile included)]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

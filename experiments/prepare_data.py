"""Tokenize local text files (byte-level) into a moe_jax token file (`<out>.bin` + `<out>.json`).

    python experiments/prepare_data.py ~/src/project docs/ "notes/**/*.md" --out data.bin --max-mb 50

Train on it with `train.data=data.bin`.
"""
import argparse
import sys
from pathlib import Path

try:
    from moe_jax import tokens
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from moe_jax import tokens


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="files, directories (walked recursively) or glob patterns")
    ap.add_argument("--out", required=True, help="output token file (.bin; a .json header goes beside it)")
    ap.add_argument("--glob", default=tokens.DEFAULT_GLOB,
                    help="comma-separated file-name patterns for directories (default: %(default)s)")
    ap.add_argument("--max-mb", type=float, default=None, help="cap on input text, in MB (1e6 bytes)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    max_bytes = None if args.max_mb is None else int(args.max_mb * 1e6)
    try:
        tokens.prepare(args.inputs, args.out, glob=args.glob, max_bytes=max_bytes,
                     progress=not args.no_progress)
    except ValueError as e:
        sys.exit(f"prepare_data: error: {e}")


if __name__ == "__main__":
    main()

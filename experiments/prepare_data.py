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
    if args.max_mb is not None and not args.max_mb > 0:  # also catches nan
        ap.error(f"--max-mb {args.max_mb:g} is invalid: must be > 0 (leave it out for no cap)")
    out = Path(args.out)
    if args.out.endswith(("/", "\\")) or out.is_dir():
        ap.error(f"--out {args.out} is a directory; name the token file, e.g. --out {out / 'corpus.bin'}")
    if not out.parent.exists():
        print(f"prepare_data: creating {out.parent}", file=sys.stderr)
    max_bytes = None if args.max_mb is None else max(1, int(args.max_mb * 1e6))
    try:
        tokens.prepare(args.inputs, args.out, glob=args.glob, max_bytes=max_bytes,
                       progress=not args.no_progress)
    except ValueError as e:
        sys.exit(f"prepare_data: error: {e}")
    except OSError as e:  # a full disk, no permission, a file where a directory should be, ...
        where = e.filename or args.out
        sys.exit(f"prepare_data: error: cannot write {where}: {e.strerror or e}; choose another --out")


if __name__ == "__main__":
    main()

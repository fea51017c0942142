"""Tokenize local files into a moe_jax token file (`<out>.bin` + `<out>.json`).

    python experiments/prepare_data.py ~/src/project docs/ "notes/**/*.md" --out data/code --max-mb 50
    python experiments/prepare_data.py corpus.jsonl shards/ --out data/web --tokenizer path/tokenizer.json
    python experiments/prepare_data.py wiki.parquet --field content --out data/wiki --tokenizer cl100k_base
    python experiments/prepare_data.py books/ --out data/books --tokenizer path/hf_checkpoint_dir

Sources: text files (one document each), JSON Lines (`.jsonl`: one document per line, its --field),
Parquet (`.parquet`: one per row, its --field column; needs pyarrow); directories are walked for --glob.
--tokenizer: `bytes` (default, no download), a Hugging Face tokenizer.json, a directory with an HF
checkpoint's tokenizer files (or a run's `tokenizer/` directory), or a tiktoken encoding name. Each
document ends with the tokenizer's EOS token (BOS before it when there is no EOS). Train on the result
with `train.data=data/NAME.bin` and `model.vocab_size` >= the vocabulary it prints.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's moe_jax, installed or not

from moe_jax import prepare  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="files, directories (walked recursively) or glob patterns")
    ap.add_argument("--out", required=True, help="output token file (.bin; a .json header goes beside it)")
    ap.add_argument("--tokenizer", default="bytes",
                    help="bytes | tokenizer.json | HF checkpoint dir | tiktoken name (default: %(default)s)")
    ap.add_argument("--field", default="text",
                    help="the text field of JSON Lines, the text column of Parquet (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=prepare.default_workers(),
                    help="tokenizing processes (default: %(default)s here); any number gives the same file")
    ap.add_argument("--glob", default=prepare.DEFAULT_GLOB,
                    help="comma-separated file-name patterns for directories (default: %(default)s)")
    ap.add_argument("--max-mb", type=float, default=None, help="cap on input text, in MB (1e6 bytes)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.max_mb is not None and not args.max_mb > 0:  # also catches nan
        ap.error(f"--max-mb {args.max_mb:g} is invalid: must be > 0 (leave it out for no cap)")
    if args.workers < 1:
        ap.error(f"--workers {args.workers} is invalid: must be >= 1")
    out = Path(args.out)
    if args.out.endswith(("/", "\\")) or out.is_dir():
        ap.error(f"--out {args.out} is a directory; name the token file, e.g. --out {out / 'corpus.bin'}")
    if not out.parent.exists():
        print(f"prepare_data: creating {out.parent}", file=sys.stderr)
    max_bytes = None if args.max_mb is None else max(1, int(args.max_mb * 1e6))
    try:
        prepare.prepare(args.inputs, args.out, tokenizer=args.tokenizer, field=args.field, workers=args.workers,
                        glob=args.glob, max_bytes=max_bytes, progress=not args.no_progress)
    except (ValueError, ImportError) as e:
        sys.exit(f"prepare_data: error: {e}")
    except OSError as e:  # a full disk, no permission, a file where a directory should be, ...
        where = e.filename or args.out
        sys.exit(f"prepare_data: error: cannot write {where}: {e.strerror or e}; choose another --out")


if __name__ == "__main__":
    main()

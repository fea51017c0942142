"""Train an MoE GPT: `python experiments/train.py --config tiny_moe [section.key=value ...]`.

Examples:
  python experiments/train.py                                   # tiny MoE on Python's stdlib sources
  python experiments/train.py --config mixtral_small train.steps=50 --benchmark
  python experiments/train.py moe.router_topk=1 moe.expert_capacity_factor=1.25 train.lr=1e-3
  python experiments/train.py train.checkpoint=true train.checkpoint_every=50 train.out_dir=runs/a
  python experiments/train.py train.data=data/web.bin train.eval_every=100   # + held-out loss/ppl every 100 steps
  python experiments/train.py --resume train.out_dir=runs/a train.steps=500     # continue that run
  python experiments/train.py --resume-from 100 train.out_dir=runs/a train.lr=1e-4  # from an older step
  python experiments/train.py --config mixtral_small parallel.expert=4 parallel.fsdp=4 parallel.data=1  # 4 GPUs
  sbatch experiments/slurm_train.sh --config mixtral_small parallel.expert=8   # N hosts (SLURM)

Flags and overrides mix in any order. A resume takes the run's own config (from its checkpoint) and
applies the overrides on top; `--config` names another base. Errors are one line on stderr
(`config error: ...`, exit 2; `error: ...`, exit 1); `--debug` (or MOE_JAX_DEBUG=1) shows tracebacks.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_jax import compile_cache, distributed, parallel, runs  # noqa: E402
from moe_jax.checkpoint import CheckpointError, quiet_failed_reads  # noqa: E402
from moe_jax.presets import load_config  # noqa: E402
from moe_jax.resume import out_dir_of, resume_config  # noqa: E402
from moe_jax.runner import NonFiniteLossError, OutOfMemoryError, train  # noqa: E402
from moe_jax.tokens import TokenFileError  # noqa: E402

DEFAULT_PRESET = "tiny_moe"
# what a user can cause and fix: one line each, no traceback
USER_ERRORS = (NonFiniteLossError, OutOfMemoryError, CheckpointError, runs.RunDirError, ValueError, OSError)


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e)


def _fail(e: BaseException, debug: bool) -> int:
    """Print a user error as one `config error:` (an invalid setting, exit 2) or `error:` (data,
    run directory, checkpoints, NaN, memory: exit 1) line; with --debug, re-raise it for the traceback."""
    if debug:
        raise e
    bad_setting = isinstance(e, ValueError) and not isinstance(e, TokenFileError)
    kind, rc = ("config error", 2) if bad_setting else ("error", 1)
    print(f"{kind}: {_message(e)}", file=sys.stderr)
    return rc


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None,
                    help=f"preset name or .yaml path (default: {DEFAULT_PRESET}; with --resume, the run's own)")
    ap.add_argument("--benchmark", action="store_true",
                    help="synthetic data, time each step, save a JSON under experiments/results/")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the latest checkpoint in <train.out_dir>/checkpoints (any mesh)")
    ap.add_argument("--resume-from", type=int, default=None, metavar="STEP",
                    help="continue from checkpoint STEP (the later ones move to <train.out_dir>/superseded/)")
    ap.add_argument("--overwrite", action="store_true",
                    help="start afresh in a train.out_dir that holds another run (its checkpoints and logs "
                         "are deleted)")
    ap.add_argument("--allow-config-change", action="store_true",
                    help="resume with settings that change the model's function (routing, RoPE, norm, ...)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines only)")
    compile_cache.add_flag(ap)
    ap.add_argument("--debug", action="store_true", help="show the traceback of errors (or MOE_JAX_DEBUG=1)")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. moe.router_topk=4 train.steps=100")
    return ap


def _config(args, overrides):
    """The run's config: the preset and overrides, or, resuming, the run's own config and overrides."""
    if args.resume or args.resume_from is not None:
        out_dir = out_dir_of(args.config, overrides, DEFAULT_PRESET)
        stored = runs.stored_config(out_dir, args.resume_from)
        return resume_config(args.config, overrides, stored_raw=stored, out_dir=out_dir,
                             default_preset=DEFAULT_PRESET)
    return load_config(args.config or DEFAULT_PRESET, overrides)


def _on_sigterm(*_):
    raise KeyboardInterrupt  # `scancel`/`kill`: the same clean exit as Ctrl-C (logs written, lock released)


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_intermixed_args(argv)
    if args.resume_from is not None and args.resume_from < 0:
        ap.error(f"--resume-from {args.resume_from}: must be a checkpoint step >= 0")
    if args.overwrite and (args.resume or args.resume_from is not None):
        ap.error("--overwrite starts afresh; it cannot be combined with --resume/--resume-from")
    debug = args.debug or os.environ.get("MOE_JAX_DEBUG", "") not in ("", "0")
    overrides = list(args.overrides)
    if args.benchmark:
        overrides = ["train.data=synthetic", "train.tensorboard=false", "train.heatmap=false"] + overrides
    quiet_failed_reads()  # a damaged checkpoint: one error line, not thousands
    distributed.initialize()  # multi-host (SLURM or JAX_COORDINATOR_ADDRESS); nothing on one host
    cache = compile_cache.enable(args.compile_cache)  # before the first compile
    if cache and distributed.is_main_process():
        print(f"compile cache: {cache}")
    try:
        cfg = _config(args, overrides)
        parallel.layout_for(cfg)  # an invalid mesh fails here, before any compile
    except USER_ERRORS as e:
        return _fail(e, debug)
    old_handler = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        summary = train(cfg, benchmark=args.benchmark, progress=not args.no_progress, resume=args.resume,
                        resume_step=args.resume_from, overwrite=args.overwrite,
                        allow_config_change=args.allow_config_change)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"interrupted: {cfg.train.out_dir} holds the logs so far; continue with --resume", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        return _fail(e, debug)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    if not distributed.is_main_process():
        return 0  # process 0 reports and writes the results
    _report(summary, cfg)
    if args.benchmark:
        _save_benchmark(summary, args)
    return 0


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _report(summary: dict, cfg) -> None:
    if summary["trained_steps"] == 0:
        print(f"nothing to do: the run is already at step {summary['step']} (train.steps={summary['steps']}); "
              f"raise train.steps to continue")
        return
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    val = (f"; val loss {summary['val_loss']:.4f} (ppl {summary['val_ppl']:.2f}) at step {summary['val_step']}"
           if "val_loss" in summary else "")
    print(f"loss {fmt(summary['first_loss'])} -> {fmt(summary['last_loss'])} over {summary['step']} steps{val}; "
          f"outputs in {cfg.train.out_dir}")


def _save_benchmark(summary: dict, args) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc)
    dev = summary["device"].replace(" ", "_")
    path = (Path(__file__).parent / "results" /
            f"train_{Path(args.config or DEFAULT_PRESET).stem}_{stamp:%Y-%m-%d}_{dev}.json")
    summary.update(date=stamp.isoformat(timespec="seconds"), config=args.config or DEFAULT_PRESET,
                   command="python experiments/train.py " + " ".join(sys.argv[1:]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
    mfu = summary.get("mfu")
    print(f"benchmark: {summary['step_time_s'] * 1e3:.1f} ms/step | {summary['tokens_per_s']:.0f} tok/s | "
          f"{summary['tflops_per_device']:.1f} TFLOP/s/dev | MFU "
          f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | peak mem {summary['peak_memory_gib']} GiB"
          f" -> {path}")


if __name__ == "__main__":
    sys.exit(main())

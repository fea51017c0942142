"""Train an MoE GPT: `python experiments/train.py --config tiny_moe [section.key=value ...]`.

Examples:
  python experiments/train.py                                   # tiny MoE on Python's stdlib sources
  python experiments/train.py --config mixtral_small train.steps=50 --benchmark
  python experiments/train.py moe.router_topk=1 moe.expert_capacity_factor=1.25 train.lr=1e-3
  python experiments/train.py train.checkpoint=true train.checkpoint_every=50 --resume  # continue a run
  python experiments/train.py --config mixtral_small parallel.expert=4 parallel.fsdp=4 parallel.data=1  # 4 GPUs
  sbatch experiments/slurm_train.sh --config mixtral_small parallel.expert=8   # N hosts (SLURM)
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_jax import distributed, parallel  # noqa: E402
from moe_jax.checkpoint import CheckpointError  # noqa: E402
from moe_jax.presets import load_config  # noqa: E402
from moe_jax.runner import NonFiniteLossError, train  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny_moe", help="preset name under experiments/configs/ or a .yaml path")
    ap.add_argument("--benchmark", action="store_true",
                    help="synthetic data, time each step, save a JSON under experiments/results/")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the latest checkpoint in <train.out_dir>/checkpoints (any mesh)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines only)")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. moe.router_topk=4 train.steps=100")
    args = ap.parse_args(argv)
    overrides = list(args.overrides)
    if args.benchmark:
        overrides = ["train.data=synthetic", "train.tensorboard=false", "train.heatmap=false"] + overrides
    distributed.initialize()  # multi-host (SLURM or JAX_COORDINATOR_ADDRESS); nothing on one host
    try:
        cfg = load_config(args.config, overrides)
        parallel.layout_for(cfg)  # an invalid mesh fails here, before any compile
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        summary = train(cfg, benchmark=args.benchmark, progress=not args.no_progress,
                        resume=args.resume)
    except (NonFiniteLossError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not distributed.is_main_process():
        return 0  # process 0 reports and writes the results
    if summary["first_loss"] is None:
        print(f"nothing to do: the checkpoint is already at train.steps={summary['steps']}; "
              f"raise train.steps to continue")
    else:
        print(f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} over {summary['steps']} "
              f"steps; outputs in {cfg.train.out_dir}")
    if args.benchmark:
        stamp = datetime.datetime.now(datetime.timezone.utc)
        dev = summary["device"].replace(" ", "_")
        path = (Path(__file__).parent / "results" /
                f"train_{Path(args.config).stem}_{stamp:%Y-%m-%d}_{dev}.json")
        summary.update(date=stamp.isoformat(timespec="seconds"), config=args.config,
                       command="python experiments/train.py " + " ".join(sys.argv[1:]))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2))
        mfu = summary.get("mfu")
        print(f"benchmark: {summary['step_time_s'] * 1e3:.1f} ms/step | {summary['tokens_per_s']:.0f} tok/s | "
              f"{summary['tflops_per_device']:.1f} TFLOP/s/dev | MFU "
              f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | peak mem {summary['peak_memory_gib']} GiB"
              f" -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

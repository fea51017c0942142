"""The training loop: data, progress bar, log lines, TensorBoard, expert-load heatmap, the NaN guard
and checkpoints, inside a run directory that one run at a time writes (`moe_jax.runs`)."""
from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from tqdm import tqdm

from moe_jax import compile_cache, distributed, metrics as M
from moe_jax import ep, parallel, runs
from moe_jax.checkpoint import Checkpointer, CheckpointError, NonFiniteStateError, abstract_state, short_error
from moe_jax.config import Config
from moe_jax.presets import to_dict
from moe_jax.data import make_dataset
from moe_jax.evaluate import evaluate, make_eval_step
from moe_jax.kernels import kernels_note
from moe_jax.model import GPT
from moe_jax.resume import check_resume
from moe_jax.tokenizer import RUN_SUBDIR, check_same_tokenizer, record_run_tokenizer, run_tokenizer_meta
from moe_jax.tokens import TokenFileError
from moe_jax.train import init_sharded_state, init_state, make_train_step, step_programs


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf (beyond `train.skip_nonfinite_steps` skipped steps)."""


class OutOfMemoryError(RuntimeError):
    """The device ran out of memory (XLA's RESOURCE_EXHAUSTED), as one line saying what to lower."""


def _fmt_rate(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def _out_of_memory(e: BaseException, cfg: Config, phase: str) -> OutOfMemoryError | None:
    if not isinstance(e, MemoryError) and "RESOURCE_EXHAUSTED" not in str(e):
        return None
    tc = cfg.train
    return OutOfMemoryError(
        f"out of memory on {jax.devices()[0].device_kind} while {phase} ({short_error(e, 160)}): lower "
        f"train.batch_size ({tc.batch_size}) or train.seq_len ({tc.seq_len}) (train.grad_accum keeps the "
        f"batch), set model.remat=true, or shard the model with parallel.fsdp / parallel.expert")


class _Steps:
    """Reads each step's metrics (one step late, so the host never stalls): a history row, a log line
    every `log_every` steps, TensorBoard scalars; non-finite steps stop the run, or are counted as
    skipped up to `train.skip_nonfinite_steps`. Steps are numbered from 1, as the log prints them."""

    def __init__(self, cfg: Config, record: runs.RunRecord, writer: M.Writer, write, n_dev: int,
                 flops_tok: float, peak: float | None):
        self.cfg, self.record, self.writer, self.write = cfg, record, writer, write
        self.n_dev, self.flops_tok, self.peak = n_dev, flops_tok, peak
        self.load_LE, self.skipped, self.last_val = None, 0, {}
        self.t_last, self.tok_since = time.perf_counter(), 0

    def restart_clock(self) -> None:
        self.t_last, self.tok_since = time.perf_counter(), 0

    def consume(self, n: int, m: dict, val: dict | None = None) -> None:
        """Record step n's metrics `m`; `val` (an evaluation after step n, `moe_jax.evaluate`) joins
        the history row, forces the log line and goes to TensorBoard under `val/`."""
        tc, mc = self.cfg.train, self.cfg.model
        loss, gnorm = float(m["loss"]), float(m["grad_norm"])
        if not (np.isfinite(loss) and np.isfinite(gnorm)):
            what = f"loss became {loss}" if not np.isfinite(loss) else f"gradient norm became {gnorm}"
            self.skipped += 1
            if self.skipped > tc.skip_nonfinite_steps:
                limit = (f" (the {tc.skip_nonfinite_steps} allowed by train.skip_nonfinite_steps are used up)"
                         if tc.skip_nonfinite_steps else "")
                raise NonFiniteLossError(f"{what} at step {n}{limit}: stopping (lower train.lr, enable "
                                         f"train.grad_clip, or check the data)")
            self.record.append({"step": n, "loss": None, "skipped": True})
            self.write(f"step {n:>6} | {what}: update skipped ({self.skipped} of "
                       f"train.skip_nonfinite_steps={tc.skip_nonfinite_steps})")
            return
        row = {"step": n, "loss": loss, "ce": float(m["ce"])}
        if "mtp_loss" in m:
            row["mtp_loss"] = float(m["mtp_loss"])
        if "routed_counts" in m:
            counts_LE = np.asarray(m["routed_counts"])
            self.load_LE = counts_LE if self.load_LE is None else self.load_LE + counts_LE
            row["imbalance"] = float(M.imbalance(counts_LE).max())
            row["dropped"] = int(np.asarray(m["dropped"]).sum())
        if val:
            row.update(val)
            self.last_val = {"val_step": n, **val}
        self.record.append(row)
        if n % tc.log_every and n != tc.steps and not val:
            return
        now = time.perf_counter()
        tok_s = self.tok_since / max(now - self.t_last, 1e-9)
        tflops = tok_s * self.flops_tok / 1e12 / self.n_dev
        mfu = f"{100 * tflops / self.peak:.1f}%" if self.peak else "n/a"
        aux = {k: float(v) for k, v in m.items() if k.endswith("loss") and k != "loss"}
        aux_s = "".join(f" | {k} {v:.4f}" for k, v in aux.items())
        bal = f" | imbalance {row['imbalance']:.2f}" if "imbalance" in row else ""
        val_s = ""
        if val:
            val_s = f" | val loss {val['val_loss']:.4f} ppl {val['val_ppl']:.2f}"
            val_s += f" dropped {val['val_dropped']}" if "val_dropped" in val else ""
        self.write(f"step {n:>6} | loss {loss:.4f}{aux_s} | lr {float(m['lr']):.2e} | "
                   f"{_fmt_rate(tok_s)} tok/s | {tflops:.2f} TFLOP/s/dev | MFU {mfu}{bal}{val_s}")
        sc = {"loss/total": loss, "loss/ce": row["ce"], "opt/lr": float(m["lr"]), "opt/grad_norm": gnorm,
              "perf/tokens_per_s": tok_s, "perf/tflops_per_device": tflops,
              **{f"loss/{k}": v for k, v in aux.items()}}
        if "routed_counts" in m:
            for j, layer in enumerate(mc.moe_layers):
                c = counts_LE[j]
                sc[f"moe/layer{layer}/imbalance"] = float(M.imbalance(c[None])[0])
                sc.update({f"moe/layer{layer}/tokens_expert{e}": float(v) for e, v in enumerate(c)})
            sc["moe/dropped"] = row["dropped"]
        sc.update({f"val/{k[4:]}": v for k, v in (val or {}).items()})
        self.writer.scalars(n, sc)
        self.restart_clock()


def _all_or_none(error: BaseException | None) -> None:
    """Raise `error`; with several processes, on all of them when any has one (process 0 alone takes
    the lock and cleans up: the others must not wait for it at a collective)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
        if failed.any() and error is None:
            raise runs.RunDirError(f"process {int(np.argmax(failed))} refused train.out_dir (see its error)")
    if error is not None:
        raise error


def init_run_state(cfg: Config, layout: parallel.Layout | None):
    """(graphdef, TrainState, state shardings or None, param counts) of a run: on one device the model
    is built and split; with a layout the state is created directly in its shards."""
    mc, tc = cfg.model, cfg.train
    if layout is None:
        model = GPT(mc, rngs=nnx.Rngs(tc.seed))
        graphdef, state = init_state(model, tc)
        return graphdef, state, None, M.param_counts(model)
    counts = M.param_counts(nnx.eval_shape(lambda: GPT(mc, rngs=nnx.Rngs(tc.seed))))
    return (*init_sharded_state(mc, tc, layout), counts)


def _check_run_tokenizer(cfg: Config, out: Path, tok_meta: dict | None) -> None:
    """A resumed run must read data made with its own tokenizer (where both are recorded)."""
    recorded = run_tokenizer_meta(out)
    if tok_meta is None or recorded is None:
        return
    try:
        check_same_tokenizer(recorded, tok_meta, f"train.data={cfg.train.data}", f"run {out}'s tokenizer")
    except ValueError as e:
        raise TokenFileError(f"{e}: prepare the data with that tokenizer (prepare_data.py --tokenizer "
                             f"{out / 'tokenizer'}) or start a new run") from None


def _validate_run_dir(cfg: Config, out: Path, *, resume: bool, resume_step: int | None, overwrite: bool,
                      allow_config_change: bool, log, tok_meta: dict | None = None) -> int | None:
    """Checks before anything is written: the checkpoint to resume (returned; None = start fresh), its
    config against `cfg` and its tokenizer against the data's (`tok_meta`), or, for a fresh run, that
    `out` holds no other run's checkpoints."""
    steps = runs.checkpoint_steps(out)
    if not resume:
        if steps and not overwrite:
            raise runs.RunDirError(
                f"train.out_dir={out} already holds the checkpoints {steps} of another run; continue it "
                f"with --resume, replace it with --overwrite, or choose another train.out_dir")
        return None
    stored = runs.stored_config(out, resume_step)  # an absent resume_step: CheckpointError
    if not steps:
        log(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from step 0")
        return None
    step = steps[-1] if resume_step is None else resume_step
    _check_run_tokenizer(cfg, out, tok_meta)
    check_resume(stored, cfg, where=str(out / "checkpoints" / str(step)),
                 allow_function_change=allow_config_change, log=log)
    return step


def train(cfg: Config, *, benchmark: bool = False, progress: bool = True, log=print, resume: bool = False,
          resume_step: int | None = None, overwrite: bool = False, allow_config_change: bool = False) -> dict:
    """Train `cfg` for `cfg.train.steps` steps; return a summary dict (also saved as summary.json).

    One run at a time writes `train.out_dir` (a lock; a second run is refused with the first one's pid
    and start time). With `train.checkpoint`, the state is saved (async) every `checkpoint_every`
    steps and at the end under `<out_dir>/checkpoints`, only after that step's loss and gradient norm
    were read and found finite; a NaN/inf stops the run (NonFiniteLossError) with the latest finite
    checkpoint the latest. `resume` continues from the latest checkpoint (`resume_step`: that one; the
    later ones move to `superseded/`), restored into this run's layout, after comparing `cfg` with
    the checkpoint's config (`moe_jax.resume`); a fresh run into a directory holding checkpoints needs
    `overwrite`. history.json and summary.json are appended to and written on every exit path.
    """
    tc, mc = cfg.train, cfg.model
    resume = resume or resume_step is not None
    # multi-host: every process trains; process 0 alone logs and writes the run's files (checkpoints
    # are written by all, as Orbax requires)
    main = distributed.is_main_process()
    if not main:
        log, progress = (lambda *_, **__: None), False
    out = Path(tc.out_dir)
    data = make_dataset(tc, mc.vocab_size)  # token files are checked before any model is built
    val_data = make_dataset(tc, mc.vocab_size, split="val") if tc.eval_every and not benchmark else None
    tok_meta = data.file.tokenizer_meta if getattr(data, "file", None) is not None else None
    layout = parallel.layout_for(cfg)  # None on one device; else the mesh over all hosts' devices
    lock, error = contextlib.nullcontext(), None
    if main:
        try:
            lock = runs.RunLock.acquire(out, log=log)
        except runs.RunDirError as e:
            error = e
    _all_or_none(error)
    with lock:
        try:
            start_ckpt = _validate_run_dir(cfg, out, resume=resume, resume_step=resume_step,
                                           overwrite=overwrite, allow_config_change=allow_config_change, log=log,
                                           tok_meta=tok_meta)
            error = None
        except (runs.RunDirError, CheckpointError, ValueError) as e:
            error = e
        _all_or_none(error)
        # -- validation passed: from here on the run directory is written
        if main and overwrite and not resume:
            runs.clear_run(out, log=log)
        if main and tok_meta is not None:  # the run keeps its tokenizer (generate, evaluate, resume)
            warning = record_run_tokenizer(out, tok_meta)
            if warning:
                log(warning)
        elif main and not resume:  # synthetic data: no tokenizer; drop a stale one of an earlier attempt
            shutil.rmtree(out / RUN_SUBDIR, ignore_errors=True)
        _all_or_none(None)  # the others wait for process 0's clean-up
        return _train(cfg, data, val_data, layout, out, start_ckpt=start_ckpt, resume=resume, benchmark=benchmark,
                      progress=progress, log=log, main=main)


def _train(cfg: Config, data, val_data, layout, out: Path, *, start_ckpt: int | None, resume: bool, benchmark: bool,
           progress: bool, log, main: bool) -> dict:
    tc, mc = cfg.train, cfg.model
    if layout is not None:
        disp = ""
        if mc.moe is not None and layout.moe_mesh.shape["expert"] > 1:
            row = jax.ShapeDtypeStruct((1, mc.d_model), jnp.dtype(mc.dtype))
            disp = f" | dispatcher {ep.resolve_type(mc.moe.dispatcher.type, row)}"
        if mc.moe is not None and mc.moe.recompute_rows is True and layout.num_devices > 1:  # said, not dropped
            disp += " | moe.recompute_rows applies to one device: the mesh's dispatchers keep their rows"
        log(f"mesh: {layout.describe()}{disp}")
    try:
        graphdef, state, shardings, counts = init_run_state(cfg, layout)
    except Exception as e:  # noqa: BLE001
        oom = _out_of_memory(e, cfg, "creating the model and optimizer state")
        if oom:
            raise oom from None
        raise
    ckpt = Checkpointer(out / "checkpoints", keep=tc.keep_checkpoints, keep_every=tc.keep_every) \
        if tc.checkpoint or start_ckpt is not None else None
    if start_ckpt is not None:
        target = abstract_state(state)
        del state  # free the fresh state before reading the checkpoint into its layout
        state = ckpt.restore(target, start_ckpt)
        log(f"resumed from {ckpt.directory / str(int(state.step))}")
        if main and runs.supersede_checkpoints(out, start_ckpt, log=log):
            ckpt.all_steps()  # the manager forgets the checkpoints moved aside
    if main:  # the run's config, once the checkpoint it continues has been read
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    step_fn = make_train_step(graphdef, tc, layout=layout, shardings=shardings)
    eval_fn = None if val_data is None else make_eval_step(mc, layout=layout, shardings=shardings)
    tokens_per_step = tc.batch_size * tc.seq_len
    flops_tok = M.flops_per_token(mc, counts["active"], tc.seq_len)
    peak = tc.peak_tflops or M.peak_tflops()
    n_dev = 1 if layout is None else layout.num_devices
    log(f"model: {counts['total'] / 1e6:.2f}M params, {counts['active'] / 1e6:.2f}M active "
        f"({len(mc.moe_layers)} MoE layers) | {jax.devices()[0].device_kind} | "
        f"{tokens_per_step} tokens/step | {flops_tok / 1e9:.3f} GFLOP/token | {kernels_note(mc)} | step as "
        + {"layers": "per-layer programs", "one": "one program"}[step_programs(tc, mc.scan_layers, layout)])

    start = int(state.step)
    record = runs.RunRecord(out, start_step=start, resume=resume, write=main, log=log)
    fields = {"steps": tc.steps, "step": start, "params": counts, "flops_per_token": flops_tok,
              "device": jax.devices()[0].device_kind, "jax": jax.__version__}
    writer = M.Writer(out / "tb" if tc.tensorboard and not benchmark and main else None)
    bar = tqdm(total=tc.steps, initial=min(start, tc.steps), disable=not progress, dynamic_ncols=True,
               desc="train")
    steps = _Steps(cfg, record, writer, bar.write if progress else log, n_dev, flops_tok, peak)
    config_dict, step_times = to_dict(cfg), []
    saved_at = start

    def save() -> None:
        nonlocal saved_at
        n = int(state.step)
        try:
            ckpt.save(state, config=config_dict)  # async: returns once the arrays are on the host
        except NonFiniteStateError as e:
            raise NonFiniteLossError(f"the state after step {n} is not finite ({e}): stopping (lower "
                                     f"train.lr, enable train.grad_clip, or check the data)") from None
        saved_at = n
        record.write("running", **{**fields, "step": n})  # the logs as far as the checkpoint goes

    status, message, close_error = "error", None, None
    try:
        pending = None  # (step number, metrics) not read yet
        # the data position on the host (each step advances it by one, skipped or not): reading
        # state.data_pos would wait for the step before and leave the GPU idle while this one is sent
        data_pos, done_at = int(state.data_pos), []
        t_first, hits_before = time.perf_counter(), compile_cache.hits()

        def consume(pending, val=None):  # waits for that step; with benchmark, notes when it ended
            steps.consume(*pending, val=val)
            if benchmark:
                done_at.append(time.perf_counter())

        for i in range(start, tc.steps):
            batch = data.batch(data_pos)
            data_pos += 1
            if layout is not None:
                batch = parallel.put_batch(batch, layout)
            state, m = step_fn(state, batch)
            if pending is not None:
                consume(pending)  # the step before: this one is already queued behind it
            steps.tok_since += tokens_per_step
            if i == start:  # keep compilation out of the throughput numbers
                jax.block_until_ready(m["loss"])
                steps.write(compile_cache.first_step_note(time.perf_counter() - t_first,
                                                          compile_cache.hits() - hits_before))
                steps.restart_clock()
            pending = (i + 1, m)
            bar.update(1)
            val = None
            if eval_fn is not None and ((i + 1) % tc.eval_every == 0 or i + 1 == tc.steps):
                val = evaluate(eval_fn, state.params, state.model_state, val_data, tc.eval_batches, mc,
                               layout=layout)
                consume(pending, val=val)
                pending = None
            if ckpt is not None and tc.checkpoint and tc.checkpoint_every and (i + 1) % tc.checkpoint_every == 0:
                if pending is not None:
                    consume(pending)  # this step's loss and grad norm are finite, or we stop unsaved
                    pending = None
                save()
            if val is not None:
                steps.restart_clock()  # keep evaluation out of the throughput numbers
        if pending is not None:
            consume(pending)
        step_times = list(np.diff(done_at))  # ends of consecutive steps (the next one queued behind each)
        if ckpt is not None and tc.checkpoint and saved_at != int(state.step):
            save()
        status = "finished"
    except NonFiniteLossError as e:
        status, message = "nonfinite", str(e)  # raised again below, with the checkpoint to go back to
    except KeyboardInterrupt:
        status, message = "interrupted", "interrupted (Ctrl-C)"
        raise
    except Exception as e:  # noqa: BLE001
        oom = _out_of_memory(e, cfg, f"running step {record.segment['end_step'] + 1}")
        status, message = "error", str(oom) if oom else short_error(e)
        if oom:
            raise oom from None
        raise
    finally:
        bar.close()
        writer.close()
        if ckpt is not None:
            try:
                ckpt.close()  # pending (finite) saves finish: no idle minutes, no orphaned threads
            except CheckpointError as e:
                if status == "finished":
                    status, message, close_error = "error", str(e), e
                else:
                    log(f"error: {e}")
        latest = runs.checkpoint_steps(out)
        fields.update(step=record.segment["end_step"], checkpoints=latest,
                      trained_steps=record.segment["end_step"] - start, **steps.last_val)
        if status == "nonfinite":
            message += (f"; the latest checkpoint is step {latest[-1]} ({out / 'checkpoints' / str(latest[-1])}): "
                        f"continue with --resume or --resume-from STEP and a lower train.lr" if latest
                        else "; no checkpoint was saved")
        elif status == "interrupted":
            log(f"interrupted after step {fields['step']}; " +
                (f"the latest checkpoint is step {latest[-1]}" if latest else "no checkpoint was saved"))
        if status != "finished":
            try:
                record.write(status, message, **fields)
            except OSError as e:  # e.g. the disk is full: keep the error that stopped the run
                log(f"error: could not write {out / 'summary.json'}: {e.strerror or e}")
    if close_error is not None:
        raise close_error
    if status == "nonfinite":
        raise NonFiniteLossError(message)

    if benchmark and len(step_times) > 3:
        med = float(np.median(step_times[min(5, len(step_times) // 2):]))
        tflops = tokens_per_step * flops_tok / med / 1e12 / n_dev
        fields.update(num_devices=n_dev, step_time_s=med, tokens_per_s=tokens_per_step / med,
                      tflops_per_device=tflops, mfu=tflops / peak if peak else None,
                      peak_memory_gib=M.peak_memory_gib())
    if main and steps.load_LE is not None and tc.heatmap and not benchmark:
        fields["heatmap"] = str(M.save_load_heatmap(steps.load_LE, mc.moe_layers, out / "expert_load.png"))
    return record.write("finished", None, **fields)

"""Multi-host start-up: `jax.distributed.initialize` when the environment says this process is one of
several; nothing on a single host. Call `initialize()` before anything touches the devices.

Recognised environments:
- explicit: `JAX_COORDINATOR_ADDRESS=host:port`, `JAX_NUM_PROCESSES=N`, `JAX_PROCESS_ID=i`
  (optionally `JAX_LOCAL_DEVICE_IDS=0,1,...`);
- SLURM: `srun` with more than one task (`SLURM_NTASKS > 1`); JAX reads the coordinator, process
  count and id from the SLURM variables itself (one task per node, all its GPUs, is the usual way).
After it, `jax.devices()` lists the devices of every host, and the mesh in `parallel.make_layout` spans
them all: the same code path for 1 and N hosts.
"""
from __future__ import annotations

import os
from typing import Mapping

import jax

_DONE = False


def detect(env: Mapping[str, str] = os.environ) -> dict | None:
    """The `jax.distributed.initialize` arguments this environment asks for, or None (one process)."""
    if env.get("JAX_COORDINATOR_ADDRESS"):
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(k)]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not: set all three "
                             "(or launch with srun and unset JAX_COORDINATOR_ADDRESS)")
        kw = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"],
              "num_processes": int(env["JAX_NUM_PROCESSES"]), "process_id": int(env["JAX_PROCESS_ID"])}
        if env.get("JAX_LOCAL_DEVICE_IDS"):
            kw["local_device_ids"] = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
        return kw if kw["num_processes"] > 1 else None
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_JOB_ID"):
        return {}  # JAX's SLURM cluster detection fills in everything
    return None


def initialize(env: Mapping[str, str] = os.environ, log=print) -> bool:
    """Start JAX's distributed runtime if `detect` says so. True when running multi-process."""
    global _DONE
    kw = detect(env)
    if kw is None or _DONE:
        return _DONE
    jax.distributed.initialize(**kw)
    _DONE = True
    log(f"distributed: process {jax.process_index()}/{jax.process_count()}, "
        f"{jax.local_device_count()} local / {jax.device_count()} global devices")
    return True


def is_main_process() -> bool:
    """Process 0 writes logs, results and checkpoints metadata."""
    return jax.process_index() == 0

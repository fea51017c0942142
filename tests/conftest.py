"""Test setup: 8 fake host devices (set before jax is imported), float32 matmuls, the `gpu` and `devices(n)`
markers, no persistent compilation cache from the training CLI (tests that want one pass their own
directory)."""
import os

os.environ.setdefault("MOE_JAX_COMPILE_CACHE", "none")

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# On the CPU (the README's test command, CI), XLA compiles most of what the suite runs once: skip LLVM's
# optimisation of the generated code. The suite then runs in ~3/4 of the time (19:52 -> 14:39 on 2 cores;
# tests/test_layer_programs.py 154 -> 102 s). Not on a GPU machine's `pytest -m gpu`, whose kernels run as the
# device compiles them.
# A test whose work is running compiled code more than compiling it runs in a process without them
# (tests/test_bench_scripts.py's bench_ops: 46 s with them off, 324 s on).
CPU_QUICK_COMPILE_FLAGS = " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if os.environ.get("JAX_PLATFORMS") == "cpu" and "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += CPU_QUICK_COMPILE_FLAGS

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_numpy_rank_promotion", "raise")  # broadcasts must be written out


def _has_gpu() -> bool:
    try:
        return jax.devices()[0].platform == "gpu"
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests without a GPU, and `devices(n)` tests where the default backend has fewer than n
    devices (a GPU machine's own count; the CPU gets 8 host devices above)."""
    gpu, count = _has_gpu(), jax.device_count()
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(skip_gpu)
        mark = item.get_closest_marker("devices")
        if mark is not None and count < mark.args[0]:
            item.add_marker(pytest.mark.skip(
                reason=f"builds a mesh of {mark.args[0]} devices; {jax.default_backend()} has {count} here "
                       f"(JAX_PLATFORMS=cpu runs it on 8 host devices)"))

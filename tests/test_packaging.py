"""A wheel built from the repo, installed without `-e`, loads every preset by name and finds the
kernels' tuning tables (package data, not files of the source tree)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_installed_wheel_loads_every_preset(tmp_path):
    pip = [sys.executable, "-m", "pip"]
    build = subprocess.run(pip + ["wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                                  str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True)
    if build.returncode and "setuptools" in build.stderr and "No module named" in build.stderr:
        pytest.skip("setuptools is not installed in this environment")
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("moe_jax-*.whl"))
    site = tmp_path / "site"
    inst = subprocess.run(pip + ["install", "-q", "--no-deps", "--no-index", "--target", str(site),
                                 str(wheel)], capture_output=True, text=True)
    assert inst.returncode == 0, inst.stderr[-2000:]
    check = textwrap.dedent(f"""
        import moe_jax, ops.tuning
        from moe_jax.presets import load_config, preset_names
        assert moe_jax.__file__.startswith({str(site)!r}), moe_jax.__file__
        names = preset_names()
        assert {{"tiny_moe", "mixtral_small", "deepseek_small", "dense_small"}} <= set(names), names
        for name in names:
            load_config(name)
        assert ops.tuning._table("grouped_matmul").get("H100"), "tuning table not shipped"
        print("ok", len(names))
    """)
    run = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stderr[-3000:]

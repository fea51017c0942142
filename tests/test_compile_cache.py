"""moe_jax.compile_cache: which directory the training CLI gives JAX's persistent compilation cache, that
JAX then reads it back (a cache hit after the in-memory caches are cleared), and the CLI end to end
(the step's entry written where the log line says)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_jax import compile_cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def updates(monkeypatch):
    """jax.config.update calls of the cache directory recorded, and no update made (the suite's process
    keeps its cache off)."""
    calls = []
    monkeypatch.setattr(compile_cache.jax.config, "update", lambda k, v: calls.append((k, v))
                        if k == "jax_compilation_cache_dir" else None)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    return calls


def test_directory_choice(tmp_path, monkeypatch, updates):
    monkeypatch.delenv("MOE_JAX_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_dir() == str(tmp_path / "xdg" / "moe_jax" / "jax")
    assert compile_cache.enable() == str(tmp_path / "xdg" / "moe_jax" / "jax")
    assert (tmp_path / "xdg" / "moe_jax" / "jax").is_dir()
    monkeypatch.setenv("MOE_JAX_COMPILE_CACHE", str(tmp_path / "env"))
    assert compile_cache.enable() == str(tmp_path / "env")
    assert compile_cache.enable(str(tmp_path / "flag")) == str(tmp_path / "flag")  # the flag over the env
    assert [v for _, v in updates] == [str(tmp_path / d) for d in ("xdg/moe_jax/jax", "env", "flag")]
    for off in ("none", "OFF", ""):
        assert compile_cache.enable(off) is None
    monkeypatch.setenv("MOE_JAX_COMPILE_CACHE", "none")
    assert compile_cache.enable() is None
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_own"))  # JAX's own setting stands
    assert compile_cache.enable(str(tmp_path / "flag")) == str(tmp_path / "jax_own")
    assert len(updates) == 3  # no update in the last five calls


def test_a_directory_that_cannot_be_made_warns_and_leaves_it_off(tmp_path, updates):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="compilation cache off"):
        assert compile_cache.enable(str(blocker / "cache")) is None
    assert updates == []


def _run(code: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_jax_reads_the_entry_back(tmp_path):
    code = f"""
import jax, jax.numpy as jnp
from moe_jax import compile_cache
hits = []
jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name))
print(compile_cache.enable({str(tmp_path / 'c')!r}))
assert jax.config.jax_compilation_cache_max_size == compile_cache.MAX_BYTES
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
f = lambda x: jnp.sin(x) @ x.T + 1
jax.jit(f)(jnp.ones((8, 8))).block_until_ready()
jax.clear_caches()  # only the disk cache is left
jax.jit(f)(jnp.ones((8, 8))).block_until_ready()
print(hits.count("/jax/compilation_cache/cache_hits"))
"""
    lines = _run(code).split()
    assert lines[0] == str(tmp_path / "c") and int(lines[-1]) >= 1
    assert list((tmp_path / "c").iterdir())


def test_training_cli_writes_the_step(tmp_path):
    cache = tmp_path / "cache"
    out = _run(f"""
import sys
sys.argv = ["train.py", "--no-progress", "--compile-cache", {str(cache)!r}, "train.steps=1",
            "train.out_dir={tmp_path / 'run'}", "train.tensorboard=false", "train.heatmap=false",
            "train.programs=one"]  # one program, over the cache's 1 s threshold (per-layer ones here are not)
sys.path.insert(0, "experiments")
import train
sys.exit(train.main())
""", MOE_JAX_COMPILE_CACHE="none")
    assert f"compile cache: {cache}" in out
    assert any(p.name.startswith("jit_step-") for p in cache.iterdir())  # the train step's program
    assert f"(compiling the step included; kept in the compile cache ({cache}) for a rerun)" in out


def test_first_step_note_counts_the_cache_hits(tmp_path):
    """hits() counts JAX's cache-hit events once enable() listens; the first-step line says which."""
    code = f"""
import jax, jax.numpy as jnp
from moe_jax import compile_cache
assert compile_cache.hits() == 0
compile_cache.enable({str(tmp_path / 'c')!r})
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
f = lambda x: jnp.cos(x) @ x.T - 2
jax.jit(f)(jnp.ones((8, 8))).block_until_ready()
print(compile_cache.hits())
print(compile_cache.first_step_note(12.25, 0))
jax.clear_caches()
h = compile_cache.hits()
jax.jit(f)(jnp.ones((8, 8))).block_until_ready()
print(compile_cache.first_step_note(0.5, compile_cache.hits() - h))
"""
    lines = _run(code).splitlines()
    assert lines[0] == "0"
    assert lines[1] == ("first step: 12.2 s (compiling the step included; kept in the compile cache "
                        f"({tmp_path / 'c'}) for a rerun)")
    assert lines[2] == "first step: 0.5 s (the step's program read from the compile cache)"


@pytest.mark.parametrize("script,extra", [("evaluate", []), ("generate", ["--prompt", "x"])])
def test_the_inference_clis_take_the_flag(script, extra, tmp_path, capsys, monkeypatch, updates):
    """--compile-cache DIR reaches compile_cache.enable before the run is read (a missing run: one error line)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    mod = __import__(script)
    rc = mod.main(["--run", str(tmp_path / "no_run"), "--compile-cache", str(tmp_path / "c"), *extra])
    assert rc != 0 and "no_run" in capsys.readouterr().err
    assert updates == [("jax_compilation_cache_dir", str(tmp_path / "c"))]

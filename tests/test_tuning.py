"""The grouped-GEMM tuning table's device lookup: own entries, the Hopper fallback, untuned devices."""
from types import SimpleNamespace

import pytest

from ops import tuning


def dev(kind):
    return SimpleNamespace(device_kind=kind, platform="gpu")


@pytest.mark.parametrize("kind, own, key", [
    ("NVIDIA H200", "H200", "H200"),                    # tuned on the H200 itself (2026-12-02)
    ("NVIDIA H100 80GB HBM3", "H100", "H100"),
    ("NVIDIA H800", "H800", "H100"),                    # same SM: the H100's table
    ("NVIDIA H20", "H20", "H100"),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-80GB", "default"),
])
def test_device_key(kind, own, key):
    assert tuning.own_key(dev(kind)) == own
    assert tuning.device_key(dev(kind)) == key


def test_table_note_names_the_table_and_untuned_devices():
    assert tuning.table_note(dev("NVIDIA H200")) == "H200 tuning table"
    assert tuning.table_note(dev("NVIDIA H800")) == "H100 tuning table, used for NVIDIA H800"
    assert "untuned default tiles" in tuning.table_note(dev("NVIDIA A100-SXM4-80GB"))


def test_every_tuned_entry_covers_the_shape_classes():
    """Each device entry holds a fwd and a wgrad config for every class the autotune sweeps."""
    table = tuning._table("grouped_matmul")
    classes = {"g>16,n<2048,k<4096", "g>16,n>=2048,k<4096", "g<=16,n>=2048,k<4096", "g<=16,n>=2048,k>=4096"}
    for key in ("H100", "H200"):
        for kernel in ("fwd", "wgrad"):
            assert classes <= set(table[key][kernel]), (key, kernel)


def test_transposed_rhs_prefers_its_own_entry_for_exactly_its_class(monkeypatch):
    """fwd_config(transpose_rhs=True) takes the table's fwd_t entry of the exact class, else the fwd
    lookup (never a fwd_t entry of a neighbouring K bucket)."""
    fwd = {"g<=16,n>=2048,k<4096": {"tile_m": 128, "tile_n": 128, "max_concurrent_steps": 6},
           "g<=16,n>=2048,k>=4096": {"tile_m": 128, "tile_n": 128, "max_concurrent_steps": 4}}
    fwd_t = {"g<=16,n>=2048,k>=4096": {"tile_m": 128, "tile_n": 128, "max_concurrent_steps": 5,
                                        "pingpong": True}}
    monkeypatch.setattr(tuning, "_table", lambda name: {"H200": {"fwd": fwd, "fwd_t": fwd_t}})
    monkeypatch.setattr(tuning, "device_key", lambda device=None: "H200")
    long_k = (32768, 8192, 2048, 8)   # fc1's dgrad at mixtral_small: k>=4096
    short_k = (32768, 2048, 2048, 8)
    assert tuning.fwd_config(*long_k, transpose_rhs=True).max_concurrent_steps == 5
    assert tuning.fwd_config(*long_k, transpose_rhs=True).pingpong
    assert tuning.fwd_config(*long_k).max_concurrent_steps == 4          # the forward keeps its own
    assert tuning.fwd_config(*short_k, transpose_rhs=True).max_concurrent_steps == 6  # fwd's exact class


def test_an_exact_shape_entry_wins_over_its_class(monkeypatch):
    """A preset's own GEMM swept at its shape (key "g=G,k=K,n=N") takes that entry, in fwd, fwd_t and
    wgrad; other shapes of the class keep the class's."""
    cls = "g>16,n>=2048,k<4096"
    fwd = {cls: {"max_concurrent_steps": 6}, tuning.exact_key(2048, 2816, 64): {"max_concurrent_steps": 3}}
    fwd_t = {tuning.exact_key(2816, 2048, 64): {"max_concurrent_steps": 5}}
    wgrad = {cls: {"max_concurrent_steps": 3}, tuning.exact_key(1408, 2048, 64): {"max_concurrent_steps": 2}}
    monkeypatch.setattr(tuning, "_table", lambda name: {"H200": {"fwd": fwd, "fwd_t": fwd_t, "wgrad": wgrad}})
    monkeypatch.setattr(tuning, "device_key", lambda device=None: "H200")
    assert tuning.exact_key(2048, 2816, 64) == "g=64,k=2048,n=2816"
    assert tuning.fwd_config(98304, 2048, 2816, 64).max_concurrent_steps == 3     # exact
    assert tuning.fwd_config(98304, 1408, 2048, 64).max_concurrent_steps == 6     # its class
    assert tuning.fwd_config(98304, 2816, 2048, 64, transpose_rhs=True).max_concurrent_steps == 5
    assert tuning.fwd_config(98304, 2816, 2048, 64).max_concurrent_steps == 6     # untransposed: the class
    assert tuning.wgrad_config(98304, 1408, 2048, 64).max_concurrent_steps == 2
    assert tuning.wgrad_config(98304, 2048, 2816, 64).max_concurrent_steps == 3

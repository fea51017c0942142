"""experiments/profile_model.py runs end to end on CPU (tiny_moe; the trace has no GPU kernels there) and
sorts kernels into the categories the GPU report uses."""
import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import gpu_timeline  # noqa: E402
import profile_model  # noqa: E402


def test_profile_model_runs_on_cpu(tmp_path):
    out = tmp_path / "profile.json"
    hlo = tmp_path / "step.hlo.txt.gz"
    profile_model.main(["--config", "tiny_moe", "--steps", "2", "--wall-steps", "2", "--out", str(out),
                        "--hlo-out", str(hlo), "train.batch_size=2", "train.seq_len=32", "train.programs=one"])
    res = json.loads(out.read_text())
    with gzip.open(hlo, "rt") as f:  # the compiled step's HLO text, gzipped by its name
        assert "ENTRY" in f.read()
    assert res["wall_ms"] > 0 and res["compile_s"] > 0 and res["traced_steps"] == 2 and res["host_ms"] > 0
    assert set(res["categories"]) == set(profile_model.CATEGORY_NAMES)
    assert res["overrides"] == ["train.batch_size=2", "train.seq_len=32", "train.programs=one"]
    assert res["params"]["active"] > 0
    assert res["events_source"] in (None, "host XLA:CPU ops")  # no GPU here
    buffers = res["xla_buffers_gib"]  # the state comes in and, donated, goes out in the same buffers
    assert buffers["arguments"] > 0 and buffers["temp"] > 0 and 0 < buffers["aliased"] <= buffers["outputs"]
    if res["events"]:  # XLA:CPU op events: joined to the compiled HLO, and the optimizer found by source
        assert res["hlo_mapped_share"] > 0.9
        assert res["categories"]["optimizer"]["ms_per_step"] > 0
        assert sum(c["share"] for c in res["categories"].values()) == pytest.approx(1.0)
        assert sum(bool(r["op_name"] and r["source"]) for r in res["top_kernels"]) > len(res["top_kernels"]) / 2


def test_profile_model_runs_the_per_layer_programs(tmp_path):
    """train.programs=layers: no single program to compile ahead; the first step's time is compile_s."""
    out = tmp_path / "profile.json"
    profile_model.main(["--config", "tiny_moe", "--steps", "1", "--wall-steps", "2", "--out", str(out),
                        "train.batch_size=2", "train.seq_len=32", "train.programs=layers"])
    res = json.loads(out.read_text())
    assert res["wall_ms"] > 0 and res["compile_s"] > 0 and res["xla_buffers_gib"] is None
    assert set(res["categories"]) == set(profile_model.CATEGORY_NAMES)


@pytest.mark.parametrize("kernel,op_name,want", [
    ("gmm_fwd_kernel", "", "grouped GEMM"),
    ("gmm_wgrad_kernel", "jit(step)/while/body/closed_call/transpose(jvp())/pallas_call", "grouped GEMM"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopB_NNT", "", "dense GEMM"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas",
     "jit(step)/while/body/closed_call/jvp(bsd,dnh->bsnh)/dot_general", "dense GEMM"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", "",
     "attention"),
    ("loop_multiply_fusion", "jit(step)/while/body/closed_call/transpose(jvp(dot_product_attention))/mul",
     "attention"),
    ("rope_qkv_bwd", "", "elementwise/fusion"),
    ("loop_gather_fusion", "", "gather/scatter"),
    ("input_scatter_fusion", "", "gather/scatter"),
    ("loop_multiply_fusion", "", "elementwise/fusion"),
    ("loop_convert_fusion_3", "jit(step)/while/body/closed_call/jvp()/convert_element_type", "elementwise/fusion"),
    ("input_reduce_fusion", "", "reductions"),
    ("loop_transpose_fusion", "", "copies/transposes"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "", "collectives"),
    ("some_unknown_kernel", "", "other"),
])
def test_category(kernel, op_name, want):
    assert profile_model.category(kernel, op_name) == want


def test_category_uses_source_and_hlo_op():
    adam = "optax/_src/transform.py:294 scale_by_adam.<locals>.update_fn < moe_jax/train.py:123 step"
    assert profile_model.category("loop_multiply_fusion", "jit(step)/mul", "multiply_fusion.3", adam) == "optimizer"
    copy = "moe_jax/weight_copy.py:55 refresh.<locals>.<lambda>"  # the update fused with the bf16 copy
    assert profile_model.category("loop_add_convert_fusion_1", "jit(step)/convert_element_type",
                                  "loop_add_convert_fusion.1", copy) == "optimizer"
    gmm = "ops/grouped_matmul.py:46 xla_fwd < moe_jax/experts.py:18 grouped_ffn"
    assert profile_model.category("dot_general.3", "jit(step)/jvp()/dot_general", "dot_general.3", gmm) == \
        "grouped GEMM"
    assert profile_model.category("ynn_fusion.7", "jit(step)/jvp(bsd,dnh->bsnh)/dot_general") == "dense GEMM"
    assert profile_model.category("MemcpyD2D", "", "") == "copies/transposes"
    assert profile_model.category("loop_add_fusion", "", "all-reduce.1") == "collectives"


def test_hlo_metadata_and_busy_time():
    text = """HloModule jit_step

FileNames
1 "/x/site-packages/optax/_src/transform.py"
2 "/repo/moe_jax/train.py"

FunctionNames
1 "scale_by_adam.<locals>.update_fn"
2 "make_train_step.<locals>.step"

FileLocations
1 {file_name_id=1 function_name_id=1 line=294 end_line=294 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=123 end_line=123 column=1 end_column=2}

StackFrames
1 {file_location_id=2 parent_frame_id=1}
2 {file_location_id=1 parent_frame_id=2}

ENTRY %main.1 (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0), metadata={op_name="state.params"}
  ROOT %multiply_fusion.3 = f32[4]{0} fusion(%p), kind=kLoop, calls=%f, metadata={op_name="jit(step)/mul" \
stack_frame_id=2}
}
"""
    meta = profile_model.hlo_metadata(text)
    assert meta["multiply_fusion.3"] == {
        "op_name": "jit(step)/mul", "source": "optax/_src/transform.py:294 scale_by_adam.<locals>.update_fn",
        "frames": ["optax/_src/transform.py:294 scale_by_adam.<locals>.update_fn",
                   "moe_jax/train.py:123 make_train_step.<locals>.step"]}
    assert profile_model._instruction("multiply_fusion_3", {}, meta) == "multiply_fusion.3"
    ev = [("a", 0, 10, {}), ("b", 5, 10, {}), ("c", 20, 5, {}), ("d", 21, 2, {})]  # overlapping streams
    assert gpu_timeline.busy_ns(ev) == 15 + 5


def test_split_time_keeps_each_hlo_op_of_a_shared_kernel():
    """GPU-like events: one cuBLAS kernel behind a projection and an attention dot, a fusion found by
    its kernel name alone (no hlo_op stat, as inside a command buffer), and an unknown kernel."""
    meta = {"custom-call.1": {"op_name": "jit(step)/jvp(bsd,dnh->bsnh)/dot_general", "source": "m.py:1 f",
                              "frames": ["m.py:1 f"]},
            "custom-call.2": {"op_name": "jit(step)/jvp(vmap(BTNH,BSNH->BNTS))/dot_general", "source": "m.py:2 f",
                              "frames": ["m.py:2 f"]},
            "loop_multiply_fusion.3": {"op_name": "jit(step)/mul", "source": "optax/_src/transform.py:1 u",
                                       "frames": ["optax/_src/transform.py:1 u", "moe_jax/train.py:2 step"]}}
    events = [("nvjet_tst_a", 0, 3_000_000, {"hlo_op": "custom-call.1"}),
              ("nvjet_tst_a", 3_000_000, 1_000_000, {"hlo_op": "custom-call.2"}),
              ("loop_multiply_fusion_3", 4_000_000, 500_000, {}),
              ("mystery", 5_000_000, 500_000, {})]
    split, top, mapped, _ = profile_model.split_time(events, meta, steps=1, top=3)
    assert split["dense GEMM"]["ms_per_step"] == pytest.approx(3.0)
    assert split["attention"]["ms_per_step"] == pytest.approx(1.0)
    assert split["optimizer"]["ms_per_step"] == pytest.approx(0.5) and split["other"]["share"] == pytest.approx(0.1)
    assert mapped == pytest.approx(0.9)
    assert [(r["kernel"], r["hlo_op"], r["category"]) for r in top] == [
        ("nvjet_tst_a", "custom-call.1", "dense GEMM"), ("nvjet_tst_a", "custom-call.2", "attention"),
        ("loop_multiply_fusion_3", "loop_multiply_fusion.3", "optimizer")]


def test_gaps_are_measured_after_the_union_of_overlapping_kernels():
    g = {"cuda_graph_id": 3}
    ev = [("a", 0, 10_000, g), ("b", 5_000, 10_000, g),   # overlap: busy until 15 us
          ("c", 18_000, 1_000, {}),                         # 3 us gap after b
          ("d", 150_000, 1_000, g),                         # 131 us gap after c
          ("e", 151_500, 500, g)]                           # 0.5 us gap after d
    out = gpu_timeline.gaps(ev, steps=1)
    assert out["count_per_step"] == 3
    assert out["ms_per_step"] == pytest.approx((3_000 + 131_000 + 500) / 1e6)
    assert out["buckets"]["<5us"] == {"ms_per_step": pytest.approx(3.5e-3), "count_per_step": 2}
    assert out["buckets"][">=100us"]["count_per_step"] == 1
    assert out["top"][0] == {"before": "c", "after": "d [graph]", "ms_per_step": pytest.approx(0.131),
                             "count_per_step": 1}
    assert out["top"][1]["before"] == "b [graph]" and out["top"][1]["after"] == "c"


def test_a_copy_in_the_gaps_names_its_program_and_size():
    ev = [("k", 0, 1_000, {}),
          ("MemcpyD2D", 200_000, 1_000, {"hlo_module": "jit__update", "memcpy_details": "kind:D2D size:2097152"}),
          ("MemcpyD2D", 400_000, 1_000, {})]
    top = gpu_timeline.gaps(ev, steps=1)["top"]
    assert top[0]["after"] == "MemcpyD2D (jit__update, 2.0 MiB)"
    assert top[1] == {"before": "MemcpyD2D (jit__update, 2.0 MiB)", "after": "MemcpyD2D (?)",
                      "ms_per_step": pytest.approx(0.199), "count_per_step": 1}


def test_split_time_by_program_counts_the_per_layer_update_as_optimizer():
    """Per-layer programs: no HLO text maps the kernels, their hlo_module does."""
    events = [("loop_add_fusion", 0, 2_000_000, {"hlo_module": "jit__update"}),
              ("loop_add_fusion", 2_000_000, 1_000_000, {"hlo_module": "jit__layer_backward"}),
              ("input_reduce_fusion", 3_000_000, 500_000, {"hlo_module": "jit__sumsq"}),
              ("nvjet_tst_a", 4_000_000, 1_000_000, {"hlo_module": "jit__layer_forward"})]
    split, top, _, programs = profile_model.split_time(events, {}, steps=2, top=4)
    assert split["optimizer"]["ms_per_step"] == pytest.approx(1.25)
    assert split["elementwise/fusion"]["ms_per_step"] == pytest.approx(0.5)
    assert split["dense GEMM"]["ms_per_step"] == pytest.approx(0.5)
    assert programs == {"jit__update": pytest.approx(1.0), "jit__layer_backward": pytest.approx(0.5),
                        "jit__layer_forward": pytest.approx(0.5), "jit__sumsq": pytest.approx(0.25)}
    assert top[0]["program"] == "jit__update" and top[0]["category"] == "optimizer"


def test_dump_metadata_maps_the_per_layer_programs(tmp_path):
    """Kernels of per-layer programs map through an XLA dump directory: by program name and id where a
    name was compiled more than once, by name alone where once; never through another program's id."""
    def module(fusion, op):
        return (f"HloModule m\n\nENTRY %main (p: f32[4]) -> f32[4] {{\n  %p = f32[4]{{0}} parameter(0)\n"
                f"  ROOT %{fusion} = f32[4]{{0}} fusion(%p), kind=kLoop, calls=%f, "
                f'metadata={{op_name="{op}" source_file="/r/moe_jax/layers.py" source_line=7}}\n}}\n')
    files = {"module_0098.jit__layer_backward.sm_9.0_gpu_after_optimizations.txt": module("gemm_fusion_dot.7", "a"),
             "module_0100.jit__layer_backward.sm_9.0_gpu_after_optimizations.txt": module("gemm_fusion_dot.7", "b"),
             "module_0092.jit__layer_forward.sm_9.0_gpu_after_optimizations.txt": module("loop_add_fusion", "c"),
             "module_0092.jit__layer_forward.sm_9.0_gpu_after_optimizations-buffer-assignment.txt": "not HLO"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    pm = profile_model.dump_metadata(tmp_path)
    assert set(pm) == {"jit__layer_backward#98", "jit__layer_backward#100", "jit__layer_forward#92",
                       "jit__layer_forward"}
    events = [("gemm_fusion_dot_7", 0, 2_000_000, {"hlo_module": "jit__layer_backward", "program_id": 100}),
              ("gemm_fusion_dot_7", 0, 1_000_000, {"hlo_module": "jit__layer_backward", "program_id": "98"}),
              ("loop_add_fusion", 0, 500_000, {"hlo_module": "jit__layer_forward", "program_id": 5}),
              ("gemm_fusion_dot_7", 0, 500_000, {"hlo_module": "jit__other", "program_id": 98})]
    _, top, mapped, _ = profile_model.split_time(events, {}, steps=1, top=4, program_meta=pm)
    assert [(r["program"], r["hlo_op"], r["op_name"], r["source"]) for r in top] == [
        ("jit__layer_backward", "gemm_fusion_dot.7", "b", "/r/moe_jax/layers.py:7"),
        ("jit__layer_backward", "gemm_fusion_dot.7", "a", "/r/moe_jax/layers.py:7"),
        ("jit__layer_forward", "loop_add_fusion", "c", "/r/moe_jax/layers.py:7"),
        ("jit__other", "", "", "")]
    assert mapped == pytest.approx(3.5 / 4.0)

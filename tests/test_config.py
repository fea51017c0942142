import dataclasses

import pytest

from moe_jax.config import Config, ModelConfig, MoEConfig, TrainConfig, capacity
from moe_jax.presets import apply_overrides, build_config, load_config, load_raw, to_dict

PRESETS = ["tiny_moe", "mixtral_small", "deepseek_small", "dense_small"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_round_trip(name):
    cfg = load_config(name)
    assert build_config(to_dict(cfg)) == cfg


def test_preset_contents():
    ds = load_config("deepseek_small").model.moe
    assert ds.router_score_function == "sigmoid" and ds.router_num_groups and ds.router_enable_expert_bias
    assert ds.shared_expert_intermediate_size > 0 and ds.num_experts == 64
    assert load_config("dense_small").model.moe is None
    tiny = load_config("tiny_moe").model
    assert tiny.moe_layers == (1, 2, 3)


def test_overrides_sections_bare_and_megatron_pattern():
    cfg = load_config("tiny_moe", ["moe.router_topk=4", "steps=7", "model.dtype=bfloat16",
                                   "moe.layer_freq=([0]*1+[1]*3)", "moe.z_loss_coeff=null",
                                   "moe.expert_capacity_factor=1.5"])
    assert cfg.model.moe.router_topk == 4 and cfg.train.steps == 7 and cfg.model.dtype == "bfloat16"
    assert cfg.model.moe.layer_freq == (0, 1, 1, 1)
    assert cfg.model.moe.z_loss_coeff is None and cfg.model.moe.expert_capacity_factor == 1.5


def test_ambiguous_bare_override():
    with pytest.raises(ValueError, match="ambiguous.*model.ffn_hidden_size.*moe.ffn_hidden_size"):
        apply_overrides({}, ["ffn_hidden_size=8"])


@pytest.mark.parametrize("override,match", [
    (["moe.router_topk=9"], r"MoEConfig.router_topk=9 .*<= num_experts \(8\)"),
    (["moe.router_num_groups=4", "moe.router_group_topk=5", "moe.router_topk=5"],
     r"router_group_topk=5 .*<= router_num_groups \(4\)"),
    (["moe.router_num_groups=3", "moe.router_group_topk=1"], r"router_num_groups=3 .*divide num_experts"),
    (["moe.router_score_function=tanh"], r"router_score_function='tanh'.*softmax.*sigmoid.*sqrtsoftplus"),
    (["moe.router_load_balancing_type=switch"], r"router_load_balancing_type='switch'.*aux_loss"),
    (["moe.expert_capacity_factor=0"], r"expert_capacity_factor=0 .*> 0"),
    (["moe.expert_capacity_factor=-1.0"], r"expert_capacity_factor=-1.0"),
    (["model.d_model=0"], r"ModelConfig.d_model=0 .*positive"),
    (["moe.num_experts=-2"], r"MoEConfig.num_experts=-2 .*positive"),
    (["train.batch_size=0"], r"TrainConfig.batch_size=0"),
    (["model.num_kv_heads=3"], r"num_kv_heads=3 .*divide num_heads \(4\)"),
    (["moe.routr_topk=2"], r"unknown key moe.routr_topk; did you mean 'router_topk'"),
    (["modle.d_model=2"], r"did you mean 'model'"),
    (["moe.layer_freq=[0,1]"], r"one entry per layer"),
    (["moe.token_drop_policy=random"], r"token_drop_policy='random'"),
    (["moe.apply_probs_on_input=true"], r"requires router_topk == 1"),
    (["train.seq_len=4096"], r"seq_len=4096 .*max_seq_len"),
    (["moe.pad_expert_input_to_capacity=true"], r"needs expert_capacity_factor"),
])
def test_invalid_values_name_field_value_and_allowed(override, match):
    with pytest.raises(ValueError, match=match):
        load_config("tiny_moe", override)


def test_unknown_yaml_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(ValueError, match="unknown key model.d_modle; did you mean 'd_model'"):
        load_config(str(p))
    p.write_text("trian:\n  steps: 3\n")
    with pytest.raises(ValueError, match="did you mean 'train'"):
        load_config(str(p))


def test_unknown_preset_suggests():
    with pytest.raises(ValueError, match="did you mean 'tiny_moe'"):
        load_config("tiny_mo")


def test_frozen_and_capacity():
    cfg = MoEConfig(num_experts=4, router_topk=2, expert_capacity_factor=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_experts = 3
    assert capacity(10, cfg) == 5          # ceil(10*2/4*1.0)
    assert capacity(10, dataclasses.replace(cfg, expert_capacity_factor=1.1)) == 6
    assert capacity(10, dataclasses.replace(cfg, expert_capacity_factor=None)) is None


def test_layer_pattern_semantics():
    m = ModelConfig(num_layers=4, moe=MoEConfig(layer_freq=2))
    assert m.moe_layers == (0, 2)
    assert ModelConfig(num_layers=3, moe=None).moe_layers == ()
    assert Config(model=m, train=TrainConfig(seq_len=16)).model is m
    assert load_raw("tiny_moe")["moe"]["num_experts"] == 8


# ---------------------------------------------------------------------------------------------
# Typed overrides and the values the issue found accepted (issue 15, finding 7 and the error list).

@pytest.mark.parametrize("override,match", [
    ("model.tie_embeddings=Flase", r"ModelConfig.tie_embeddings='Flase' is invalid: must be true or false"),
    ("train.checkpoint=flase", r"TrainConfig.checkpoint='flase' is invalid: must be true or false"),
    ("moe.router_pre_softmax=fasle", r"MoEConfig.router_pre_softmax='fasle' is invalid"),
    ("train.checkpoint=yes", r"TrainConfig.checkpoint='yes' is invalid: must be true or false"),
    ("moe.dispatcher.fallback=1", r"MoEConfig.dispatcher.fallback='1' is invalid: must be true or false"),
    ("train.lr=abc", r"TrainConfig.lr='abc' is invalid: must be a finite number"),
    ("train.lr=.nan", r"TrainConfig.lr=nan is invalid"),
    ("moe.aux_loss_coeff=x", r"MoEConfig.aux_loss_coeff='x' is invalid: must be a finite number"),
    ("train.steps=10.0", r"TrainConfig.steps=10.0 is invalid: must be an integer"),
    ("train.steps=1e3", r"TrainConfig.steps=1000.0 is invalid: must be an integer"),
    ("model.d_model=abc", r"ModelConfig.d_model='abc' is invalid: must be an integer"),
    ("parallel.expert=two", r"ParallelConfig.expert='two' is invalid: must be an integer"),
    ("train.b1=5", r"TrainConfig.b1=5 is invalid: must be in \[0, 1\)"),
    ("train.b2=-3", r"TrainConfig.b2=-3 is invalid: must be in \[0, 1\)"),
    ("train.eps=0", r"TrainConfig.eps=0 is invalid: must be > 0"),
    ("train.weight_decay=-1", r"TrainConfig.weight_decay=-1 is invalid: must be >= 0"),
    ("train.out_dir=", r"TrainConfig.out_dir='' is invalid: must not be empty"),
    ("train.seed=-1", r"TrainConfig.seed=-1 is invalid: must be >= 0"),
    ("train.skip_nonfinite_steps=-1", r"TrainConfig.skip_nonfinite_steps=-1 is invalid"),
    ("model.max_seq_len=null", r"ModelConfig.max_seq_len=None is invalid: must be an integer"),
])
def test_typed_overrides_refuse_typos(override, match):
    with pytest.raises(ValueError, match=match):
        load_config("tiny_moe", [override])


def test_typed_overrides_accept_what_they_should():
    cfg = load_config("tiny_moe", ["model.tie_embeddings=False", "train.checkpoint=TRUE", "train.out_dir=2024",
                                   "train.lr=1", "moe.dispatcher.expert_major=null", "model.attention_impl=None",
                                   "train.grad_clip=null", "moe.layer_freq=([0]*1+[1]*3)", "train.data='x y'",
                                   "moe.token_dispatcher_type=allgather", "steps=7"])
    t = cfg.train
    assert cfg.model.tie_embeddings is False and t.checkpoint is True and t.out_dir == "2024"
    assert t.lr == 1 and t.grad_clip is None and t.data == "x y" and t.steps == 7
    assert cfg.model.moe.dispatcher.expert_major is None and cfg.model.moe.dispatcher.type == "allgather"
    assert cfg.model.moe.layer_freq == (0, 1, 1, 1) and cfg.model.attention_impl == "auto"  # None: auto


def test_yaml_values_are_type_checked(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("model:\n  tie_embeddings: Flase\n")
    with pytest.raises(ValueError, match=r"ModelConfig.tie_embeddings='Flase' is invalid"):
        load_config(str(p))


@pytest.mark.parametrize("text,match", [
    ("model:\n  d_model: [1, 2\n", r"p.yaml' is not valid YAML at line 3"),
    ("model: 5\n", r"section 'model' must be a mapping"),
    ("- 1\n- 2\n", r"p.yaml' must be a mapping of sections .*got a list"),
    ("train:\n  steps: 3\n  steps: 4\n", None),   # YAML's own rule: the last key wins
])
def test_malformed_presets_name_the_file(tmp_path, text, match):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    if match is None:
        assert load_config(str(p)).train.steps == 4
        return
    with pytest.raises(ValueError, match=match):
        load_config(str(p))


def test_binary_preset_names_the_file(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(ValueError, match=r"p.yaml' is not a text \(UTF-8\) YAML file"):
        load_config(str(p))


@pytest.mark.devices(8)
def test_grad_accum_layout_error_names_the_batch_size_set():
    from moe_jax import parallel
    cfg = load_config("tiny_moe", ["train.grad_accum=2", "train.batch_size=8", "parallel.data=8"])
    with pytest.raises(ValueError, match=r"TrainConfig.batch_size=8 is invalid with grad_accum=2: .*"
                                         r"\(batch_size/grad_accum = 4\) .* multiple of 16"):
        parallel.layout_for(cfg)


def test_str_or_bool_override_takes_a_string():
    assert load_config("tiny_moe", ["model.remat=selective"]).model.remat == "selective"
    assert load_config("tiny_moe", ["model.remat=true"]).model.remat == "full"
    with pytest.raises(ValueError, match="remat"):
        load_config("tiny_moe", ["model.remat=sometimes"])

"""Config loading, dotted overrides, and every validation rule (each error names its key)."""

from __future__ import annotations

import pytest
import yaml

from rspo_mega.config import ConfigError, TrainConfig, dump_config, save_config
from rspo_mega.config.paths import TINY_DEFAULT
from rspo_mega.setup import load_run_config, run_config_from_dict, validate_run


def test_defaults_validate_and_layout():
    cfg = load_run_config()
    layout = validate_run(cfg, world_size=1)
    assert isinstance(cfg, TrainConfig)
    assert layout.dp == 1
    assert layout.prompts_per_step == cfg.global_batch_size // cfg.rollout.group_size
    assert layout.completions_per_rank == cfg.global_batch_size
    # the built-in tokenizer's ids, known before it is trained
    assert (cfg.model.vocab_size, cfg.model.mask_token_id, cfg.model.eos_token_id) == (512, 3, 2)


def test_embedded_default_validates():
    cfg = load_run_config(TINY_DEFAULT)
    assert validate_run(cfg, world_size=1).prompts_per_step == 16
    assert cfg.algorithm.name == "rspo"


def test_sft_recipe_validates_with_an_unbiased_estimator():
    sft = load_run_config(TINY_DEFAULT.parent / "tiny_sudoku_sft.yaml")
    validate_run(sft, world_size=1)
    assert sft.algorithm.name == "sft" and sft.likelihood.mask_scheme == "coupled"
    assert sft.likelihood.mask_sharing == "completion"


@pytest.mark.parametrize("key, where", [
    ("micro_batch_size", "algorithm.microbatch_completions"),
    ("checkpoint.load_dir", "newest valid checkpoint in checkpoint.save_dir"),
    ("parallel.cp", "context parallelism is not supported"),
    ("rollout.mode", "set rollout.confidence_threshold instead: null is the exact schedule"),
])
def test_removed_keys_say_where_their_setting_went(key, where):
    with pytest.raises(ConfigError, match=f"config key '{key}' was removed: .*{where}"):
        load_run_config(None, [f"{key}=1"])


def test_confidence_threshold_is_the_decoding_mode():
    assert load_run_config(None).rollout.confidence_threshold is None  # the exact schedule
    assert load_run_config(TINY_DEFAULT).rollout.confidence_threshold == 0.9
    with pytest.raises(ConfigError, match=r"'rollout.confidence_threshold' must be in \(0, 1\]"):
        load_run_config(None, ["rollout.confidence_threshold=0"])


REMOVED = ["sft_warmup_steps", "sft_warmup_target_accuracy", "sft_warmup_min_steps",
           "sft_warmup_check_interval", "sft_warmup_holdout", "optimizer.sft_lr",
           "optimizer.reset_for_rl", "likelihood.sft_mask_scheme"]


@pytest.mark.parametrize("key", REMOVED)
def test_warm_up_keys_are_refused_with_where_sft_went(key, tmp_path):
    expected = (f"config key '{key}' was removed: .*run SFT as its own run \\(algorithm.name=sft, "
                "e.g. --config rspo_mega/configs/tiny_sudoku_sft.yaml\\) and start RL from it "
                "with checkpoint.init_from")
    with pytest.raises(ConfigError, match=expected):
        load_run_config(None, [f"{key}=1"])
    *sections, leaf = key.split(".")
    data: dict = {leaf: None}
    for section in reversed(sections):
        data = {section: data}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=expected):
        load_run_config(path)
    assert not any(f.startswith("sft_") for f in TrainConfig.__dataclass_fields__)


@pytest.mark.parametrize("overrides, message", [
    (["likelihood.mask_scheme=one_step"], "likelihood.mask_scheme='one_step' does not suit "
     "algorithm.name='sft' (it maximises the ELBO itself): use one of ['bernoulli', 'stratified', "
     "'coupled']"),
    (["likelihood.mask_sharing=group"], "an SFT run (algorithm.name=sft) has one target per prompt"),
])
def test_sft_runs_refuse_estimators_that_are_not_its_elbo(overrides, message):
    for scheme in ("bernoulli", "stratified", "coupled"):
        validate_run(load_run_config(None, ["algorithm.name=sft",
                                           f"likelihood.mask_scheme={scheme}"]))
    validate_run(load_run_config(None, ["algorithm.name=rspo", *overrides]))  # RL: allowed
    with pytest.raises(ConfigError) as err:
        validate_run(load_run_config(None, ["algorithm.name=sft", *overrides]))
    assert message in str(err.value)


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"parallel": {"tp": 2}, "model": {"num_query_groups": 2}}))
    cfg = load_run_config(path, ["parallel.pp=2", "algorithm.lambda_=0.05", "model.hf_config=null",
                             "optimizer.lr=3e-6", "rollout.temperature=0"])
    assert (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    assert cfg.algorithm.lambda_ == 0.05 and isinstance(cfg.optimizer.lr, float)
    assert cfg.rollout.temperature == 0.0 and isinstance(cfg.rollout.temperature, float)
    assert cfg.model.num_query_groups == 2
    layout = validate_run(cfg, world_size=8)
    assert layout.dp == 2


def test_resolved_config_round_trips(tmp_path):
    cfg = load_run_config(None, ["parallel.tp=2", "model.fp8.enabled=true"])
    out = save_config(cfg, tmp_path / "run")
    again = load_run_config(out)
    assert again == cfg
    assert "fp8:" in dump_config(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["paralel.tp=2"], "unknown config key 'paralel' (did you mean 'parallel'?)"),
        (["parallel.tpp=2"], "unknown config key 'parallel.tpp' (did you mean 'tp'?)"),
        (["algorithm.lamda_=0.1"], "did you mean 'lambda_'"),
        (["parallel.tp=two"], "config key 'parallel.tp' must be an int"),
        (["parallel.tp=2.0"], "config key 'parallel.tp' must be an int"),
        (["rollout.stop_on_eos_block=3"], "'rollout.stop_on_eos_block' must be a bool"),
        (["algorithm.name=3"], "'algorithm.name' = 3 must be one of ['rspo', 'espo',"),
        (["algorithm.name=rpso"], "(did you mean 'rspo'?)"),
        (["model=3"], "config key 'model' must be a mapping"),
        (["parallel.tp.x=1"], "'parallel.tp' is not a section"),
        (["parallel.tp"], "must look like 'section.key=value'"),
        (["train_steps=null"], "'train_steps' must not be null"),
    ],
)
def test_load_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_run_config(None, overrides)
    assert message in str(err.value)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  gen_lenght: 64\n")
    with pytest.raises(ConfigError, match=r"'rollout.gen_lenght' \(did you mean 'gen_length'\?\)"):
        load_run_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.yaml")
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_run_config(path)


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallel.tp=3", "model.num_attention_heads=4"], 3,
         "model.num_attention_heads=4 is not divisible by parallel.tp=3"),
        (["parallel.tp=2", "model.num_attention_heads=4", "model.num_query_groups=1"], 2,
         "model.num_query_groups=1 is not divisible by parallel.tp=2"),
        (["model.num_attention_heads=4", "model.num_query_groups=3"], 1,
         "model.num_attention_heads=4 is not divisible by model.num_query_groups=3"),
        (["parallel.pp=3", "model.num_layers=4"], 3, "model.num_layers=4 is not divisible by parallel.pp=3"),
        (["parallel.pp=2", "parallel.vpp=4", "model.num_layers=4"], 2,
         "model.num_layers=4 is not divisible by parallel.pp*parallel.vpp=8"),
        (["parallel.vpp=2"], 1, "parallel.vpp=2 needs parallel.pp >= 2"),
        (["parallel.tp=2"], 3, "world size 3 is not divisible by parallel.tp*parallel.pp"),
        (["parallel.world_size=8"], 4, "parallel.world_size=8 but the job was launched with WORLD_SIZE=4"),
        (["global_batch_size=30", "rollout.group_size=2"], 4,
         "global_batch_size=30 is not divisible by the data-parallel size 4"),
        (["algorithm.centering=microbatch", "algorithm.microbatch_completions=5"], 1,
         "algorithm.microbatch_completions=5 does not divide a rank's 32 completions"),
        (["global_batch_size=30", "rollout.group_size=4"], 1,
         "rollout.group_size=4 does not divide global_batch_size=30"),
        (["rollout.gen_length=48", "rollout.block_length=32"], 1,
         "rollout.gen_length=48 is not divisible by rollout.block_length=32"),
        (["rollout.gen_length=64", "rollout.block_length=16", "rollout.steps=30"], 1,
         "rollout.steps=30 is not a multiple of the number of blocks 4"),
        (["rollout.gen_length=64", "rollout.block_length=16", "rollout.eval_steps=6"], 1,
         "rollout.eval_steps=6 is not a multiple of the number of blocks 4"),
        (["model.mask_token_id=512"], 1, "model.mask_token_id=512 lies outside the vocabulary"),
        (["algorithm.lambda_=-0.1"], 1, "config key 'algorithm.lambda_' must be >= 0, got -0.1"),
        (["likelihood.mc_samples=0"], 1, "config key 'likelihood.mc_samples' must be >= 1"),
        (["likelihood.mask_scheme=uniform"], 1, "'likelihood.mask_scheme' = 'uniform' must be one of"),
        (["rollout.temperature=-1"], 1, "config key 'rollout.temperature' must be >= 0"),
        (["likelihood.bernoulli_eps=1"], 1, "'likelihood.bernoulli_eps' must be in [0, 1), got 1.0"),
        (["algorithm.name=diffu_grpo"], 1,
         "likelihood.mask_scheme='coupled' does not suit algorithm.name='diffu_grpo'"),
        (["data.max_prompt_length=1000"], 1, "exceeds model.max_position_embeddings"),
        (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel=true needs parallel.tp > 1"),
        (["model.hidden_size=130"], 1, "model.hidden_size=130 is not divisible by"),
        (["data.countdown.min_numbers=4", "data.countdown.max_numbers=3"], 1,
         "data.countdown: needs 2 <= min_numbers <= max_numbers, got min_numbers=4, max_numbers=3"),
        (["data.countdown.min_target=60", "data.countdown.max_target=50"], 1,
         "data.countdown: needs 1 <= min_target <= max_target, got min_target=60"),
        (["data.countdown.max_number=0"], 1, "'data.countdown.max_number' must be >= 1, got 0"),
    ],
)
def test_validation_errors_name_the_key(overrides, world, message):
    """A field's own rules fail when the config loads, the rules between fields in validate_config."""
    with pytest.raises(ConfigError) as err:
        validate_run(load_run_config(None, overrides), world_size=world)
    assert message in str(err.value)


def test_hf_config_geometry_is_validated(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"architectures": ["LLaDAModelLM"], "n_heads": 6, "n_kv_heads": 6, "n_layers": 3,'
        ' "d_model": 96, "embedding_size": 600, "vocab_size": 600, "mask_token_id": 599,'
        ' "eos_token_id": 598, "max_sequence_length": 512}'
    )
    cfg = run_config_from_dict({"model": {"hf_config": str(tmp_path)}, "parallel": {"pp": 2}})
    assert (cfg.model.num_layers, cfg.model.mask_token_id, cfg.model.vocab_size) == (3, 599, 600)
    with pytest.raises(ConfigError, match="model.num_layers=3 is not divisible by parallel.pp=2"):
        validate_run(cfg, world_size=2)
    with pytest.raises(ConfigError, match="model.hf_config"):
        run_config_from_dict({"model": {"hf_config": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match=r"model\.num_layers=4 \(config\.json: 3\)"):
        run_config_from_dict({"model": {"hf_config": str(tmp_path), "num_layers": 4}})


def test_load_config_reads_the_yaml_alone(tmp_path):
    """The config layer reads no HF directory, hub cache or tokenizer: the setup step does."""
    from rspo_mega.config import load_config, validate_config

    given = ["checkpoint.init_from=hf:rspo/none", f"model.hf_config={tmp_path / 'nope'}",
             f"data.tokenizer={tmp_path / 'nope.model'}"]
    cfg = load_config(None, given)  # nothing named here exists: the pure loader does not look
    assert (cfg.checkpoint.init_from, cfg.model.hf_config, cfg.data.tokenizer) == (
        "hf:rspo/none", str(tmp_path / "nope"), str(tmp_path / "nope.model"))
    validate_config(load_config(None, ["data.fields={q: question}"]), world_size=1)  # a task's
    with pytest.raises(ConfigError, match="data.fields: unknown field"):
        validate_run(load_run_config(None, ["data.fields={q: question}"]), world_size=1)
    with pytest.raises(ConfigError, match="model.hf_config"):
        load_run_config(None, given[1:2])


def test_the_8b_recipes_take_the_shipped_geometry():
    from pathlib import Path

    for recipe in sorted(Path(TINY_DEFAULT).parents[2].glob("examples/configs/llada8b_*.yaml")):
        m = load_run_config(recipe).model
        assert (m.num_layers, m.hidden_size, m.vocab_size, m.mask_token_id, m.eos_token_id) == (
            32, 4096, 126464, 126336, 126081), recipe
        assert m.make_vocab_size_divisible_by == 128 and m.params_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="no shipped config.json 'nope' .shipped: llada_8b"):
        load_run_config(None, ["model.hf_config=shipped:nope"])


def test_choice_lists_have_one_home():
    """The registries that map a config choice to code cover exactly the schema's choices."""
    from rspo_mega.algorithms import LOSSES
    from rspo_mega.config import schema
    from rspo_mega.data.templates import TEMPLATES
    from rspo_mega.tasks import TASKS

    assert set(LOSSES) == set(schema.choices(schema.AlgorithmName))
    assert set(TASKS) == set(schema.BUILTIN_TASKS)
    assert set(TEMPLATES) == set(schema.choices(schema.TemplateName))

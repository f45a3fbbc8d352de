"""Config system: named configs and their values, merging, CLI flags, errors, round trips."""

import copy
import pickle
import subprocess
import sys
import textwrap

import pytest
import yaml

from dreamerv2_tf.cli import fail, from_cli, parse, usage
from dreamerv2_tf.config import (
    CONFIGS_FILE,
    SCHEDULABLE,
    Config,
    ConfigError,
    build,
    coerce,
    read_named_configs,
)

NAMED = ("defaults", "atari", "atari_paper", "dmc_vision", "dmc_proprio", "crafter", "debug", "vector",
         "atari_schedules")
CLI = "from dreamerv2_tf.cli import from_cli; from_cli()"


def cli(*args: str, code: str = CLI) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit status 2, exactly one line on stderr mentioning every needle, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def write_configs(tmp_path, text: str):
    path = tmp_path / "configs.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------- named configs and their values


def test_configs_file_holds_all_named_configs():
    names = set(read_named_configs(CONFIGS_FILE))
    assert set(NAMED) <= names


@pytest.mark.parametrize("name", NAMED)
def test_named_config_keeps_every_key_and_type(name):
    defaults = build(["defaults"]).flat()
    config = build(["defaults", name]).flat()
    assert config.keys() == defaults.keys()
    for key, value in config.items():
        if key.rsplit(".", 1)[-1] in SCHEDULABLE and isinstance(value, str):
            continue  # a schedule string in place of a number
        assert type(value) is type(defaults[key]), (key, value, defaults[key])


@pytest.mark.parametrize("name", NAMED)
def test_named_config_combines_with_debug(name):
    config = build([name, "debug"])
    assert config.rssm.deter <= 64 and config.dataset.batch <= 8
    assert config.jit == "false"


def test_counts_in_scientific_notation_are_ints():
    config = build(["defaults", "atari"])
    for key in ("steps", "eval_every", "log_every", "checkpoint_every", "replay.capacity"):
        value = config.flat()[key]
        assert type(value) is int, (key, value)
    assert config.steps == 50_000_000
    assert type(config.model_opt.lr) is float and config.model_opt.lr == 2e-4


def test_generic_defaults_follow_the_release():
    config = build(["defaults"])
    assert config.rssm.deter == 1024 and config.rssm.hidden == 1024
    assert (config.model_opt.lr, config.actor_opt.lr, config.critic_opt.lr) == (1e-4, 8e-5, 2e-4)
    assert config.discount == 0.99 and config.actor_ent == 2e-3
    assert config.prefill == 10000 and config.train_every == 5
    assert config.replay.prioritize_ends is True
    assert (config.rssm.stoch, config.rssm.discrete) == (32, 32)
    assert config.kl.balance == 0.8 and config.discount_lambda == 0.95 and config.imag_horizon == 15
    assert config.slow_target_update == 100
    assert (config.model_opt.eps, config.model_opt.clip, config.model_opt.wd) == (1e-5, 100.0, 1e-6)
    assert config.encoder.cnn_depth == 48 and config.encoder.cnn_kernels == (4, 4, 4, 4)
    assert config.decoder.cnn_kernels == (5, 5, 6, 6)
    assert (config.actor.layers, config.actor.units) == (4, 400)
    assert (config.critic.layers, config.critic.units) == (4, 400)


def test_atari_follows_the_release_settings():
    config = build(["defaults", "atari"])
    expected = {
        "rssm.deter": 600, "rssm.hidden": 600, "model_opt.lr": 2e-4, "actor_opt.lr": 4e-5,
        "critic_opt.lr": 1e-4, "discount": 0.999, "loss_scales.kl": 0.1, "loss_scales.discount": 5.0,
        "train_every": 16, "dataset.batch": 16, "dataset.length": 50, "steps": 50_000_000,
        "action_repeat": 4, "time_limit": 27000, "clip_rewards": "tanh", "prefill": 50000,
        "eval_every": 250_000, "actor_ent": 1e-3, "replay.capacity": 2_000_000,
        "atari.sticky": True, "atari.all_actions": True, "atari.lives": False, "atari.grayscale": True,
        "size": [64, 64], "encoder.cnn_keys": "image", "decoder.cnn_keys": "image",
    }
    flat = config.flat()
    assert {key: flat[key] for key in expected} == expected
    assert config.steps * config.action_repeat == 200_000_000  # 200M frames


def test_atari_paper_follows_table_d1():
    config = build(["defaults", "atari_paper"])
    expected = {
        "replay.capacity": 2_000_000, "dataset.batch": 50, "dataset.length": 50, "rssm.stoch": 32,
        "rssm.discrete": 32, "rssm.deter": 600, "loss_scales.kl": 0.1, "kl.balance": 0.8,
        "model_opt.lr": 2e-4, "clip_rewards": "tanh", "imag_horizon": 15, "discount": 0.995,
        "discount_lambda": 0.95, "actor_grad": "reinforce", "actor_grad_mix": 0.0, "actor_ent": 1e-3,
        "actor_opt.lr": 4e-5, "critic_opt.lr": 1e-4, "slow_target_update": 100, "train_every": 4,
        "actor.layers": 4, "actor.units": 400, "model_opt.clip": 100.0, "model_opt.eps": 1e-5,
        "model_opt.wd": 1e-6, "loss_scales.discount": 1.0, "time_limit": 27000, "action_repeat": 4,
    }
    flat = config.flat()
    assert {key: flat[key] for key in expected} == expected


def test_atari_paper_reproduces_the_imagined_state_count():
    # The paper: 468B imagined states over 50M agent steps; one update imagines B x L x H states.
    config = build(["defaults", "atari_paper"])
    updates = config.steps / config.train_every
    imagined = updates * config.dataset.batch * config.dataset.length * config.imag_horizon
    assert config.steps == 50_000_000
    assert imagined == pytest.approx(468e9, rel=0.01)


@pytest.mark.parametrize("name", ["dmc_vision", "dmc_proprio"])
def test_dmc_configs(name):
    config = build(["defaults", name])
    assert config.action_repeat == 2 and config.rssm.deter == 200 and config.rssm.hidden == 200
    assert config.kl.free == 1.0 and config.loss_scales.kl == 1.0
    assert config.actor_grad == "auto"  # resolves to dynamics backprop (rho = 0) for continuous actions
    assert config.actor_ent == 1e-4 and config.pred_discount is False
    assert (config.model_opt.lr, config.actor_opt.lr, config.critic_opt.lr) == (3e-4, 8e-5, 8e-5)
    assert config.clip_rewards == "identity" and config.task.startswith("dmc_")
    assert "discount" not in config.grad_heads


def test_dmc_vision_uses_images_and_dmc_proprio_vectors():
    vision, proprio = build(["dmc_vision"]), build(["dmc_proprio"])
    assert vision.encoder.cnn_keys == "image" and vision.encoder.mlp_keys == "$^"
    assert proprio.encoder.cnn_keys == "$^" and proprio.encoder.mlp_keys == ".*"
    assert proprio.log_keys_video == ()


def test_atari_schedules_anneal_entropy_and_mixing():
    config = build(["atari", "atari_schedules"])
    assert config.actor_grad == "both"
    assert config.actor_ent.startswith("linear(") and config.actor_grad_mix == "linear(0.1,0.0,2.5e6)"


def test_vector_and_debug_regex_keys_reach_both_heads():
    for name, units in (("vector", 128), ("debug", 32)):
        config = build([name])
        assert config.reward_head.units == config.discount_head.units == units
        assert config.reward_head.layers == config.discount_head.layers == 2


# ---------------------------------------------------------------- merging named configs


def test_later_named_config_wins():
    assert build(["atari", "dmc_vision"]).rssm.deter == 200
    assert build(["dmc_vision", "atari"]).rssm.deter == 600
    # Keys only the earlier config sets survive the later one.
    assert build(["atari", "dmc_vision"]).time_limit == 27000


def test_named_configs_apply_in_order_over_defaults(tmp_path):
    path = write_configs(tmp_path, """
        defaults: {a: 1, b: 2, c: {d: 0.5}}
        first: {a: 10, c.d: 1e-3}
        second: {a: 20, b: 30}
    """)
    assert build(["first", "second"], path=path).to_dict() == {"a": 20, "b": 30, "c": {"d": 1e-3}}
    assert build(["second", "first"], path=path).to_dict() == {"a": 10, "b": 30, "c": {"d": 1e-3}}
    assert build(["defaults"], path=path).to_dict() == {"a": 1, "b": 2, "c": {"d": 0.5}}


def test_overrides_apply_after_named_configs():
    config = build(["atari"], {"rssm.deter": 300, "task": "atari_breakout"})
    assert config.rssm.deter == 300 and config.task == "atari_breakout" and config.rssm.hidden == 600


def test_list_keeps_element_type_after_a_named_config_empties_it(tmp_path):
    path = write_configs(tmp_path, """
        defaults: {size: [64, 64]}
        empty: {size: []}
    """)
    config, _ = parse(["--configs", "empty", "--size", "32,48"], path)
    assert config.size == (32, 48)


def test_numbers_after_a_schedule_stay_numbers():
    config = build(["atari_schedules", "atari"])  # atari sets actor_ent 1e-3 over the schedule
    assert config.actor_ent == 1e-3 and type(config.actor_ent) is float
    config, _ = parse(["--configs", "atari_schedules", "--actor_grad_mix", "0.5"])
    assert config.actor_grad_mix == 0.5
    with pytest.raises(ConfigError, match="actor_grad_mix"):
        parse(["--configs", "atari_schedules", "--actor_grad_mix", "soon"])


# ---------------------------------------------------------------- command-line flags


def test_cli_overrides_plain_and_nested_keys():
    config, options = parse([
        "--configs", "defaults", "atari", "--task", "atari_breakout", "--rssm.deter", "200",
        "--model_opt.lr", "1e-4", "--dataset.batch=8", "--logdir=/tmp/run",
    ])
    assert config.task == "atari_breakout" and config.rssm.deter == 200 and config.rssm.hidden == 600
    assert config.model_opt.lr == 1e-4 and type(config.model_opt.lr) is float
    assert config.dataset.batch == 8 and config.logdir == "/tmp/run"
    assert options == {"help": False, "print_config": False}


@pytest.mark.parametrize("args, expected", [
    (["--log_keys_video", "image", "depth"], ("image", "depth")),
    (["--log_keys_video", "image,depth"], ("image", "depth")),
    (["--log_keys_video=image"], ("image",)),
])
def test_cli_string_lists(args, expected):
    assert parse(args)[0].log_keys_video == expected


def test_cli_number_lists_take_the_element_type():
    assert parse(["--size", "32", "48"])[0].size == (32, 48)
    assert parse(["--encoder.cnn_kernels", "3,3,3,3"])[0].encoder.cnn_kernels == (3, 3, 3, 3)
    with pytest.raises(ConfigError, match="size"):
        parse(["--size", "32.5,32"])


@pytest.mark.parametrize("text, expected", [("1e6", 1_000_000), ("2.5e5", 250_000), ("300", 300),
                                            ("12345678901234567", 12345678901234567)])
def test_cli_ints_accept_scientific_notation(text, expected):
    steps = parse(["--steps", text])[0].steps
    assert steps == expected and type(steps) is int


@pytest.mark.parametrize("text", ["1.5", "abc", "1e-3", "nan", "true"])
def test_cli_ints_reject_non_integers(text):
    with pytest.raises(ConfigError, match="steps: expected an integer"):
        parse(["--steps", text])


def test_cli_floats():
    config = parse(["--discount", "1", "--kl.free", "2.5e-1"])[0]
    assert config.discount == 1.0 and type(config.discount) is float and config.kl.free == 0.25
    with pytest.raises(ConfigError, match="discount: expected a number"):
        parse(["--discount", "high"])


@pytest.mark.parametrize("text, expected", [("true", True), ("false", False), ("True", True),
                                            ("FALSE", False)])
def test_cli_bools(text, expected):
    assert parse(["--deterministic", text])[0].deterministic is expected


@pytest.mark.parametrize("text", ["maybe", "2", "yess"])
def test_cli_bools_reject_other_words(text):
    with pytest.raises(ConfigError, match="deterministic: expected true or false"):
        parse(["--deterministic", text])


@pytest.mark.parametrize("text, expected", [("auto", "auto"), ("AUTO", "auto"), ("true", "true"),
                                            ("on", "true"), ("False", "false"), ("0", "false")])
def test_jit_is_auto_or_a_boolean_word(text, expected):
    assert parse(["--jit", text])[0].jit == expected
    assert build(["defaults"]).jit == "auto" and build(["defaults", "debug"]).jit == "false"  # YAML's false
    with pytest.raises(ConfigError, match="jit: expected auto, true or false, got 'maybe'"):
        parse(["--jit", "maybe"])


def test_regex_key_sets_every_match_and_nothing_else():
    base = build(["defaults"]).flat()
    config = parse([r"--.*\.norm", "layer"])[0].flat()
    norm_keys = [key for key in base if key.endswith(".norm")]
    assert len(norm_keys) >= 7  # rssm, encoder, decoder, two heads, actor, critic
    for key, value in config.items():
        assert value == ("layer" if key in norm_keys else base[key]), key


def test_regex_key_matching_nothing_is_an_error():
    with pytest.raises(ConfigError, match="matches no config key"):
        parse([r"--.*\.nrom", "layer"])
    with pytest.raises(ConfigError, match="invalid key pattern"):
        parse(["--rssm.(deter", "3"])


@pytest.mark.parametrize("key", SCHEDULABLE)
def test_schedules_accepted_for_schedulable_keys(key):
    config = parse([f"--{key}", "linear(3e-3, 1e-4, 1e6)"])[0]
    assert config[key] == "linear(3e-3,1e-4,1e6)"


@pytest.mark.parametrize("key", ["discount", "model_opt.lr", "kl.free"])
def test_schedules_rejected_elsewhere(key):
    with pytest.raises(ConfigError, match="expected a number"):
        parse([f"--{key}", "linear(3e-3,1e-4,1e6)"])


def test_unknown_key_suggests_close_keys():
    with pytest.raises(ConfigError, match="unknown config key 'rssm.detr'.*rssm.deter"):
        parse(["--rssm.detr", "200"])
    with pytest.raises(ConfigError, match="time_limit"):
        parse(["--time-limit", "5"])


def test_flag_errors():
    with pytest.raises(ConfigError, match="needs a value"):
        parse(["--rssm.deter"])
    with pytest.raises(ConfigError, match="unexpected argument 'atari'"):
        parse(["atari"])
    with pytest.raises(ConfigError, match="task: expected a string"):
        parse(["--task", "a", "b"])


def test_enumerated_keys_are_checked_when_the_config_is_built():
    for name in read_named_configs():
        build(["defaults", name])  # every named config uses valid choices
    assert build(["defaults"], {"actor_grad": "both"}).actor_grad == "both"
    with pytest.raises(ConfigError, match="actor_grad must be one of reinforce, dynamics, both, auto, got 'dyn'"):
        build(["defaults"], {"actor_grad": "dyn"})
    with pytest.raises(ConfigError, match="rssm.act must be one of"):
        build(["defaults"], {"rssm.act": "gelu"})


def test_coerce_uses_the_default_type():
    assert coerce("steps", "5e7", 0) == 50_000_000 and type(coerce("steps", "5e7", 0)) is int
    assert coerce("lr", 1, 0.5) == 1.0 and type(coerce("lr", 1, 0.5)) is float
    assert coerce("size", [3, "4"], (1, 1)) == (3, 4)
    with pytest.raises(ConfigError, match="expected a number"):
        coerce("lr", True, 0.5)


# ---------------------------------------------------------------- script entry: errors, help, printing


@pytest.mark.parametrize("args, needles", [
    (["--configs", "nosuch"], ["nosuch", "atari", "dmc_vision"]),
    (["--rssm.detr", "200"], ["rssm.detr", "rssm.deter"]),
    (["--steps", "1.5"], ["steps", "1.5"]),
    (["--jit", "maybe"], ["jit", "true or false"]),
    (["--discount", "linear(1,0,10)"], ["discount"]),
    ([r"--.*\.nrom", "layer"], [r".*\.nrom"]),
    (["atari"], ["atari"]),
    (["--precision", "fp16"], ["precision must be one of auto, 32, 16, bf16", "fp16"]),
    ([r"--.*\.norm", "batch"], ["norm must be one of none, layer", "batch"]),
    (["--log_keys_max", "^log_(achievement"], ["log_keys_max: not a valid regular expression", "^log_(achievement"]),
    (["--encoder.cnn_keys", "*image"], ["encoder.cnn_keys: not a valid regular expression"]),
])
def test_cli_user_errors_exit_2_with_one_line(args, needles):
    assert_user_error(cli(*args), *needles)


def test_unreadable_configs_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("defaults:\n  a: [1, 2\n  b: 3\n")  # YAML errors span several lines
    code = f"from dreamerv2_tf.cli import from_cli; from_cli(path={str(path)!r})"
    assert_user_error(cli(code=code), "broken.yaml")


def test_help_lists_named_configs():
    for flag in ("--help", "-h"):
        result = cli(flag, "--steps", "1.5")  # help wins over other mistakes
        assert result.returncode == 0, result.stderr
        for name in NAMED:
            assert name in result.stdout
    assert all(name in usage() for name in NAMED)


def test_print_config_prints_the_resolved_config():
    result = cli("--configs", "atari", "atari_schedules", "--rssm.deter", "200", "--print_config")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    expected = build(["atari", "atari_schedules"], {"rssm.deter": 200})
    assert printed == expected.to_dict()
    assert printed["rssm"]["deter"] == 200 and printed["model_opt"]["lr"] == 2e-4


def test_from_cli_returns_config_in_process():
    config = from_cli(["--configs", "debug", "--seed", "3"])
    assert config.seed == 3 and config.dataset.batch == build(["debug"]).dataset.batch


def test_fail_prints_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        fail("first\nsecond")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: first second"]


# ---------------------------------------------------------------- saving and loading


def test_save_load_round_trip(tmp_path):
    config = build(["atari", "atari_schedules"], {"log_keys_video": "image,depth", "model_opt.lr": "1e-4"})
    path = tmp_path / "config.yaml"
    config.save(path)
    loaded = Config.load(path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded == config
    assert loaded.log_keys_video == ("image", "depth") and loaded.size == (64, 64)
    assert loaded.model_opt.lr == 1e-4 and loaded.actor_opt.lr == 4e-5
    assert type(loaded.steps) is int and loaded.actor_grad_mix == "linear(0.1,0.0,2.5e6)"
    assert list(tmp_path.iterdir()) == [path]  # written atomically, no temporary file left


def test_save_load_round_trip_nested_values(tmp_path):
    config = Config({"a": [[1, 2], [3]], "b": {"c": 1e-4, "d": [0.5, "x"]}, "e": 1e-12, "f": "1e5"})
    config.save(tmp_path / "c.yaml")
    loaded = Config.load(tmp_path / "c.yaml")
    assert loaded.to_dict() == config.to_dict() == {
        "a": [[1, 2], [3]], "b": {"c": 1e-4, "d": [0.5, "x"]}, "e": 1e-12, "f": "1e5"}
    assert loaded.a == ((1, 2), (3,))


# ---------------------------------------------------------------- the Config object


def test_attribute_and_item_access():
    config = build(["atari"])
    assert config.rssm.deter == config["rssm"]["deter"] == 600
    assert isinstance(config.rssm, Config) and "rssm" in config and len(config) == len(config.to_dict())
    assert config.flat()["rssm.deter"] == 600


def test_unknown_attribute_names_the_key():
    config = build(["defaults"])
    with pytest.raises(AttributeError, match="no_such_key"):
        _ = config.no_such_key
    with pytest.raises(AttributeError, match="detr"):
        _ = config.rssm.detr
    with pytest.raises(KeyError):
        _ = config["no_such_key"]


def test_config_is_immutable():
    config = build(["defaults"])
    with pytest.raises(AttributeError):
        config.steps = 5
    with pytest.raises(AttributeError):
        config.rssm.deter = 5
    with pytest.raises(AttributeError):
        del config.steps
    with pytest.raises(TypeError):
        config["steps"] = 5
    with pytest.raises(AttributeError):
        config.size.append(3)  # lists are stored as tuples
    nested = Config({"a": [{"b": 1}]})
    with pytest.raises(TypeError):
        nested.a[0]["b"] = 2
    assert config.steps == build(["defaults"]).steps


def test_update_returns_a_new_config():
    config = build(["defaults"])
    updated = config.update({"rssm": {"deter": 7}, r".*\.act": "relu"})
    assert updated.rssm.deter == 7 and updated.actor.act == "relu" and updated.rssm.act == "relu"
    assert config.rssm.deter == 1024 and config.actor.act == "elu"
    with pytest.raises(ConfigError, match="unknown config key"):
        config.update({"rssm.nope": 1})


def test_copy_and_pickle():
    config = build(["atari", "atari_schedules"])
    for clone in (copy.deepcopy(config), copy.copy(config), pickle.loads(pickle.dumps(config))):
        assert clone == config and isinstance(clone.rssm, Config) and clone.rssm.deter == 600

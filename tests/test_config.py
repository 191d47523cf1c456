import pytest

from pipeline.config import Config, ConfigError, load_config, save_yaml


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  num_compression_tokens: 8\ntrain:\n  stage: 2\n")
    cfg = load_config(p, ["--train.max_steps=20", "--model.lora.r=4", "--model.lora.target_modules=[q_proj]",
                          "--optim.lr=1e-4", "--data.task_batch_size=null"])
    assert isinstance(cfg, Config)
    assert cfg.model.num_compression_tokens == 8 and cfg.train.stage == 2
    assert cfg.train.max_steps == 20 and cfg.model.lora.r == 4 and cfg.optim.lr == 1e-4
    assert cfg.model.lora.target_modules == ["q_proj"]
    save_yaml(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


@pytest.mark.parametrize("override, needle", [
    ("--model.nope=1", "model.nope"),
    ("--train.stage=3", "train.stage"),
    ("--optim.lr=fast", "optim.lr"),
    ("--model.lora.enabled=maybe", "model.lora.enabled"),
    ("--data.sources=5", "data.sources"),
])
def test_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_include(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  micro_batch_size: 3\n  global_batch_size: 12\n")
    (tmp_path / "child.yaml").write_text("include: base.yaml\ntrain:\n  global_batch_size: 24\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.train.micro_batch_size == 3 and cfg.train.global_batch_size == 24
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_string_keys_keep_the_override_text():
    """YAML reads off, yes and 007 as a bool or a number; a string key keeps what was typed (a
    run named "off" used to fail with 'must be a string, got False'), other keys the parsed value."""
    from pipeline.config import load_config

    c = load_config(None, ["--train.name=off", "--train.wandb_project=007", "--train.max_steps=1000",
                           "--train.deterministic=yes", "--optim.lr=1e-4"])
    assert (c.train.name, c.train.wandb_project) == ("off", "007")
    assert c.train.max_steps == 1000 and c.train.deterministic is True and c.optim.lr == 1e-4


@pytest.mark.parametrize("stage", [1, 2])
def test_help_lists_every_key_with_default_and_meaning(stage, tmp_path):
    """`python launch/stageN.py --help`, the first command a newcomer types, exited 1 with its
    text on stderr; it now exits 0 with every key, its default and meaning on stdout (generated
    from the schema, so it cannot drift) and the presets."""
    import subprocess
    import sys

    from conftest import REPO
    from pipeline.config import format_value, schema_keys

    r = subprocess.run([sys.executable, str(REPO / f"launch/stage{stage}.py"), "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    for key, default, meaning in schema_keys():
        assert meaning, f"config key {key} has no help text in pipeline/config.py"
        flag = f"--{key}={format_value(default)}"
        at = next(i for i, line in enumerate(lines) if line.strip() == flag or line.strip().startswith(flag + " "))
        assert meaning in lines[at] or meaning in lines[at + 1], key
    assert f"launch/configs/stage{stage}_tiny.yaml" in r.stdout


@pytest.mark.parametrize("argv,suggestion", [
    (["--resume", "auto"], "did you mean --train.resume=auto?"),
    (["--train.resum=auto"], "did you mean --train.resume=auto?"),
    (["--lora.r=8"], "did you mean --model.lora.r=8?"),
    (["--max_steps=3"], "did you mean --train.max_steps=3?"),
])
def test_unknown_override_suggests_the_closest_key(argv, suggestion):
    from pipeline.cli import parse_cli

    with pytest.raises(ConfigError, match=suggestion.replace(".", r"\.").replace("?", r"\?")):
        parse_cli(1, argv)


def test_fidelity_switches_are_config_choices():
    cfg = load_config(None, ["--model.mask_impl=causal", "--model.prompt_format=official",
                             "--model.lora.init=gaussian", "--model.stage1_loss=all"])
    assert (cfg.model.mask_impl, cfg.model.prompt_format, cfg.model.lora.init) == ("causal", "official", "gaussian")
    with pytest.raises(ConfigError, match="prompt_format"):
        load_config(None, ["--model.prompt_format=vlm2vec"])

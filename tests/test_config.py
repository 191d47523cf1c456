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

import json

import pytest

from common.config import Config, ConfigError, load_config, parse_value, save_config


def test_defaults_validate_and_every_field_is_documented():
    cfg = Config()
    assert cfg.learner.max_staleness == 0 and cfg.learner.loss.eps_low == 0.2
    missing = []

    def walk(model_cls, prefix):
        for name, f in model_cls.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")
            elif not f.description:
                missing.append(prefix + name)

    walk(Config, "")
    assert missing == []


def test_toml_then_set_then_flags(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('[learner]\nmax_staleness = 1\nmodel = "/m"\n[learner.optim]\nlr = 3e-4\n')
    cfg = load_config(p, ["learner.optim.lr=1e-5", "learner.optim.betas=[0.9, 0.95]", "actor.engine=hf",
                          "learner.entropy.enabled=false"], **{"learner.max_staleness": 4, "run.steps": None})
    assert cfg.learner.max_staleness == 4  # flag beats file
    assert cfg.learner.optim.lr == 1e-5 and cfg.learner.optim.betas == (0.9, 0.95)
    assert cfg.actor.engine == "hf" and cfg.learner.entropy.enabled is False and cfg.learner.model == "/m"
    assert cfg.run.steps is None  # a None flag is "not given"


def test_stages_list_override():
    cfg = load_config(overrides=["learner.stages=[{steps=2, max_response_tokens=8, prompts_per_batch=4, group_size=4},"
                                 "{steps=3, max_response_tokens=16, prompts_per_batch=2, group_size=8}]"])
    assert [s.steps for s in cfg.learner.stages] == [2, 3] and cfg.learner.stages[1].group_size == 8


@pytest.mark.parametrize("override, key", [
    ("learner.nope=1", "learner.nope"),
    ("learner.max_staleness=-1", "learner.max_staleness"),
    ("learner.loss.tis_mode=sometimes", "learner.loss.tis_mode"),
    ("actor.max_groups=zero", "actor.max_groups"),
    ("learner.entropy.coef_min=0.1", "learner.entropy"),
])
def test_bad_key_or_value_is_one_clear_line(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_malformed_set_and_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(overrides=["learner.max_staleness"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[learner\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(bad)


def test_parse_value_types():
    assert parse_value("3") == 3 and parse_value("2.5") == 2.5 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("/data/m") == "/data/m" and parse_value('"x y"') == "x y"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["learner.max_staleness=3", "learner.optim.lr=2e-4"])
    save_config(cfg, tmp_path / "c.json")
    again = load_config(tmp_path / "c.json")
    assert again == cfg
    assert json.loads((tmp_path / "c.json").read_text())["learner"]["max_staleness"] == 3

"""The typed config: file < --set precedence, validation messages, dump, path resolution."""

from __future__ import annotations

import pytest
import yaml

from sparkml_dist.config import ConfigError, load_config

REPO_CONF = "conf/local.yaml"


def test_local_yaml_loads_and_overrides_win(tmp_path):
    cfg = load_config(REPO_CONF, ["train.epochs=7", f"paths.work_dir={tmp_path}", "spark.conf={a: 1}"])
    assert cfg.train.epochs == 7
    assert cfg.spark.master == "local[2]"
    assert cfg.spark.conf["a"] == "1" and cfg.spark.conf["spark.driver.host"] == "127.0.0.1"  # a map merges (issue 32)
    assert cfg.partition.output_url == f"file://{tmp_path}/data/partitioned"
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"


def test_cluster_yaml_is_valid():
    cfg = load_config("conf/cluster.yaml")
    assert cfg.data.input_url.startswith("hdfs://")
    assert cfg.partition.num_shards == 8


def test_dump_round_trips(tmp_path):
    cfg = load_config(REPO_CONF, [f"paths.work_dir={tmp_path}", "train.hidden_sizes=[8, 4]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.dump())
    assert load_config(path) == cfg
    assert cfg.flat()["train.hidden_sizes"] == "[8, 4]"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("nope.key=1", "unknown key(s) ['nope'] in the config; valid keys: paths, spark"),
        ("train.epochz=1", "valid keys: manifest_url, model"),
        ("train.epochs=0", "train.epochs must be >= 1, got 0"),
        ("train.lr=fast", "train.lr must be a number, got 'fast'"),
        ("train.shuffle=maybe", "train.shuffle must be true or false"),
        (
            "partition.mode=sorted",
            "partition.mode must be one of shuffle_split, stratified_split, random_sample; got 'sorted'",
        ),
        ("partition.validation_fraction=1.0", "partition.validation_fraction must be in [0, 1), got 1.0"),
        ("trainepochs=3", "expected section.key=value"),
        ("spark.log_level=LOUD", "spark.log_level must be one of ERROR, WARN, INFO, DEBUG"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(REPO_CONF, [override])
    assert message in str(err.value)


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


def test_exponent_notation_is_a_number_in_yaml_and_in_set(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-4 as text: a number field takes it as the number everyone means."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  ftrl_l1: 2E-5\n")
    cfg = load_config(path, ["train.weight_decay=1.0e+2"])
    assert (cfg.train.lr, cfg.train.ftrl_l1, cfg.train.weight_decay) == (0.001, 2e-5, 100.0)
    for text in ("1e", "e-3", "1e-3x", "0x1p3"):
        with pytest.raises(ConfigError, match=f"train.lr must be a number, got '{text}'"):
            load_config(None, [f"train.lr={text}"])


def test_eval_every_steps_is_checked_and_refused_where_the_servers_evaluate():
    assert load_config(None, ["train.eval_every_steps=200"]).train.eval_every_steps == 200
    with pytest.raises(ConfigError, match=r"train.eval_every_steps must be >= 0 \(0: at epoch ends only\), got -1"):
        load_config(None, ["train.eval_every_steps=-1"])
    with pytest.raises(ConfigError, match="comm.strategy=parameter_server evaluates the servers' snapshot"):
        load_config(None, ["train.eval_every_steps=10", "comm.strategy=parameter_server"])

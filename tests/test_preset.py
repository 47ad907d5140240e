"""Presets: every setting that goes with a base model, applied in one step and validated."""

import shutil

import pytest
import yaml

from stages import preset as P
from stages.core.params import ConfigError, load_params


def _get(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree[key]
    return tree


@pytest.mark.parametrize("name", P.available())
def test_each_preset_applies_keeps_comments_and_validates(name, tmp_path, root):
    params = tmp_path / "params.yaml"
    shutil.copy(root / "params.yaml", params)
    comments_before = sum(1 for line in params.read_text().splitlines() if line.strip().startswith("#"))
    P.apply_to_file(name, params)
    loaded = load_params(params).model_dump(mode="json")
    for key, value in P.load_preset(name).items():
        assert _get(loaded, key) == value, key
    comments_after = sum(1 for line in params.read_text().splitlines() if line.strip().startswith("#"))
    assert comments_after == comments_before  # ruamel kept every comment


def test_the_documented_presets_exist():
    assert {"embedded", "smollm2-135m", "llama-3.2-1b"} <= set(P.available())
    assert P.load_preset("smollm2-135m")["train.lora.modules_to_save"] == []


def test_the_smollm2_preset_is_what_params_yaml_ships(root):
    """params.yaml's default is the pretrained SmolLM2: applying its preset changes nothing, and the
    random-weight model is a preset that changes the model and its settings."""
    tree = yaml.safe_load((root / "params.yaml").read_text())
    assert P.applied(tree, P.load_preset("smollm2-135m")) == tree
    embedded = P.applied(tree, P.load_preset("embedded"))
    assert embedded["model"]["base"] == "embedded" and embedded["train"]["learning_rate"] == 5.0e-3


def test_show_prints_one_dvc_exp_run_line():
    line = P.exp_run_line("smollm2-135m")
    assert line.startswith("dvc exp run -S model.base=smollm2-135m -S model.tokenizer=smollm2-135m")
    assert "-S 'train.lora.modules_to_save=[]'" in line and "-S train.learning_rate=0.001" in line


def test_unknown_preset_and_unknown_key_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no preset 'nope' \\(available: embedded"):
        P.load_preset("nope")
    with pytest.raises(ConfigError, match="preset key 'train.lora.rank' is not in params.yaml"):
        P.applied({"train": {"lora": {"r": 8}}}, {"train.lora.rank": 4})
    with pytest.raises(ConfigError, match="leaves params.yaml invalid"):
        P.applied(yaml.safe_load(open("params.yaml")), {"train.learning_rate": -1})

"""params.yaml, its schema and dvc.yaml agree; bad params fail early and name the key."""

import pytest
import yaml

from stages.core.params import ConfigError, Params, validate_params


def test_params_yaml_is_valid_and_complete(root):
    raw = yaml.safe_load((root / "params.yaml").read_text())
    params = validate_params(raw)
    # every schema section is written out in params.yaml, so users see every knob
    assert set(raw) == set(Params.model_fields)
    # the SmolLM2 default: rank 16, alpha 32, no dropout (presets/smollm2-135m.yaml says why)
    assert params.train.lora.r == 16 and params.train.lora.alpha == 32 and params.train.lora.dropout == 0.0
    assert params.model.base == "smollm2-135m" and params.train.shared_prefix is True and params.cpu.threads == 2


@pytest.mark.parametrize("raw,message", [
    ({"train": {"lora": {"rank": 8}}}, "train.lora.rank: unknown key"),
    ({"trian": {}}, "trian: unknown key (did you mean 'train'?)"),
    ({"train": {"epochs": 0}}, "train.epochs: Input should be greater than or equal to 1 (got 0)"),
    ({"train": {"method": "qlor"}}, "train.method: Input should be 'lora', 'qlora' or 'full' (got 'qlor')"),
    ({"train": {"learning_rate": "fast"}}, "train.learning_rate"),
    ({"preprocess": {"split": {"train": 0.5}}}, "train + val + test must sum to 1"),
    ({"preprocess": {"on_pii": "hide"}}, "preprocess.on_pii"),
])
def test_bad_params_name_the_key(raw, message):
    with pytest.raises(ConfigError) as info:
        validate_params(raw)
    assert message in str(info.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        validate_params({"train": {"epochs": -1, "batch_size": 0, "bogus": 1}})
    text = str(info.value)
    assert "train.epochs" in text and "train.batch_size" in text and "train.bogus" in text


def _schema_has(path: list[str]) -> bool:
    model = Params
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if i < len(path) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, Params.__mro__[1])):
                return isinstance(annotation, type) is False  # a dict-typed field: sub-keys are data
            model = annotation
    return True


def test_dvc_yaml_params_exist_in_params_yaml_and_schema(root):
    raw = yaml.safe_load((root / "params.yaml").read_text())
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())
    named = []
    for stage_name, stage in dvc["stages"].items():
        for entry in stage.get("params", []):
            keys = entry if isinstance(entry, str) else None
            assert keys is not None, f"stage {stage_name}: params from other files are not used here"
            named.append((stage_name, keys))
    assert named
    for stage_name, key in named:
        node = raw
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{stage_name}: {key} not in params.yaml"
            node = node[part]
        assert _schema_has(key.split(".")), f"{stage_name}: {key} not in the params schema"


def test_every_stage_reads_its_own_section(root):
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())
    for name in ("preprocess", "train"):
        keys = dvc["stages"][name]["params"]
        assert any(k == name or k.startswith(name + ".") for k in keys), name

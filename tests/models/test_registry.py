"""The model registry: built-ins, version lookup, hyperparameter bounds and site plugins."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from importlib import metadata

import pydantic
import pytest

from medveil.models import (
    LOGISTIC,
    MLP,
    ModelRecipe,
    NoHyper,
    UnknownModel,
    get_model,
    load_plugins,
    register_model,
    registered_models,
    registry,
)


@pytest.fixture
def isolated_registry(monkeypatch):
    """Registrations made by a test vanish after it."""
    snapshot = {name: dict(versions) for name, versions in registry._recipes.items()}
    monkeypatch.setattr(registry, "_recipes", snapshot)
    return snapshot


def _recipe(name: str, version: str) -> ModelRecipe:
    return ModelRecipe(name=name, version=version, Hyper=NoHyper, build=LOGISTIC.build, description="test")


def test_builtins_are_registered():
    assert {("logistic", "1"), ("mlp", "1"), ("cnn", "1"), ("resnet18", "1")} <= set(registered_models())
    assert (get_model("cnn").inputs, get_model("resnet18").inputs, LOGISTIC.inputs) == ("image", "image", "tabular")
    assert get_model("logistic") is LOGISTIC
    assert get_model("mlp", "1") is MLP
    assert MLP.key == "mlp@1"


def test_unknown_model_and_version_raise_a_key_error():
    with pytest.raises(UnknownModel):
        get_model("resnet152")
    with pytest.raises(KeyError):
        get_model("mlp", "99")
    with pytest.raises(UnknownModel):
        get_model(["mlp"])  # hostile, unhashable name


def test_newest_version_is_the_default(isolated_registry):
    for version in ("2", "10", "9"):
        register_model(_recipe("toy", version))
    assert get_model("toy").version == "10"
    assert get_model("toy", "2").version == "2"
    assert [v for n, v in registered_models() if n == "toy"] == ["2", "9", "10"]


def test_registering_twice_is_idempotent_but_shadowing_is_refused(isolated_registry):
    register_model(LOGISTIC)
    with pytest.raises(ValueError, match="already registered"):
        register_model(_recipe("logistic", "1"))
    with pytest.raises(TypeError):
        register_model("logistic")


@pytest.mark.parametrize("name, version", [("Bad Name", "1"), ("mlp@2", "1"), ("ok", "1@x"), ("ok", ""), ("", "1")])
def test_recipe_names_and_versions_are_checked(name, version):
    with pytest.raises(ValueError):
        _recipe(name, version)


def test_recipe_needs_a_pydantic_hyper():
    with pytest.raises(TypeError):
        ModelRecipe(name="x", version="1", Hyper=dict, build=LOGISTIC.build)


def test_recipe_inputs_are_tabular_or_image_with_an_image_schema():
    with pytest.raises(ValueError):
        ModelRecipe(name="x", version="1", Hyper=NoHyper, build=LOGISTIC.build, inputs="audio")
    with pytest.raises(TypeError, match="image_size and channels"):
        ModelRecipe(name="x", version="1", Hyper=NoHyper, build=LOGISTIC.build, inputs="image")


@pytest.mark.parametrize("recipe", ["cnn", "resnet18"])
def test_image_hyper_defaults_and_bounds(recipe):
    Hyper = get_model(recipe).Hyper
    hyper = Hyper()
    assert hyper.channels == 1 and 8 <= hyper.image_size <= 512
    Hyper.model_validate({"image_size": 8, "channels": 3})
    Hyper.model_validate({"image_size": 512})
    for bad in ({"image_size": 7}, {"image_size": 513}, {"image_size": 32.0}, {"image_size": True},
                {"channels": 2}, {"channels": "3"}, {"dropout": 0.5, "widths": [8], "base_width": 8}):
        with pytest.raises(pydantic.ValidationError):
            Hyper.model_validate(bad)


def test_cnn_and_resnet_specific_bounds():
    CNN, RESNET = get_model("cnn").Hyper, get_model("resnet18").Hyper
    CNN.model_validate({"widths": [256, 1, 2, 3], "dropout": 0.9})
    for bad in ({"widths": []}, {"widths": [8] * 5}, {"widths": [257]}, {"widths": [0]}, {"dropout": 1.0}):
        with pytest.raises(pydantic.ValidationError):
            CNN.model_validate(bad)
    RESNET.model_validate({"base_width": 4, "stem": "imagenet"})
    for bad in ({"base_width": 3}, {"base_width": 129}, {"stem": "vit"}, {"widths": [8]}):
        with pytest.raises(pydantic.ValidationError):
            RESNET.model_validate(bad)


def test_mlp_hyper_defaults_and_bounds():
    hyper = MLP.Hyper()
    assert hyper.hidden and hyper.dropout == 0 and hyper.activation == "relu"
    MLP.Hyper.model_validate({"hidden": [4096, 1, 2, 3], "dropout": 0.9, "activation": "tanh"})
    for bad in ({"hidden": []}, {"hidden": [8] * 5}, {"hidden": [0]}, {"hidden": [4097]},
                {"hidden": [True]}, {"hidden": ["8"]}, {"hidden": [8.5]},
                {"dropout": 0.95}, {"dropout": -0.1}, {"dropout": float("nan")},
                {"activation": "sigmoid"}, {"activation": "__import__('os')"}, {"layers": 3}):
        with pytest.raises(pydantic.ValidationError):
            MLP.Hyper.model_validate(bad)
    with pytest.raises(pydantic.ValidationError):
        LOGISTIC.Hyper.model_validate({"hidden": [8]})


def test_builtins_give_one_logit_per_row_or_k():
    torch = pytest.importorskip("torch")
    for recipe, hyper in ((LOGISTIC, NoHyper()), (MLP, MLP.Hyper(hidden=[5, 3], dropout=0.5))):
        for outputs, shape in ((1, (7,)), (3, (7, 3)), (10, (7, 10))):
            module = recipe.build(4, hyper, outputs)
            module.eval()
            assert module(torch.zeros(7, 4)).shape == shape
        assert recipe.build(4, hyper)(torch.zeros(1, 4)).shape == (1,)
    for recipe in (get_model("cnn"), get_model("resnet18")):
        hyper = recipe.Hyper(image_size=8, channels=3)
        for outputs, shape in ((1, (2,)), (4, (2, 4))):
            module = recipe.build(3, hyper, outputs)
            module.eval()
            assert module(torch.zeros(2, 3, 8, 8)).shape == shape
        with pytest.raises(ValueError, match="channel"):
            recipe.build(1, hyper, 1)
    with pytest.raises(ValueError):
        LOGISTIC.build(0, NoHyper())
    for outputs in (0, 2, 1001, True):
        with pytest.raises(ValueError):
            MLP.build(4, MLP.Hyper(), outputs)


def test_import_needs_no_torch():
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # any `import torch` now fails
        import medveil.models as models
        import medveil.models.partition
        import medveil.privacy.dpsgd as dpsgd
        assert models.get_model("mlp").key == "mlp@1"
        models.MLP.Hyper(hidden=[8])
        models.CNN.Hyper(image_size=8)
        assert models.outputs_for(2) == 1 and dpsgd.dpsgd_rho(2.0, 8) == 1.0
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


PLUGIN_SOURCE = '''
from medveil.models import LOGISTIC, ModelRecipe, NoHyper

RECIPE = ModelRecipe(name="site-plugin", version="3", Hyper=NoHyper, build=LOGISTIC.build)
SHADOW = ModelRecipe(name="logistic", version="1", Hyper=NoHyper, build=lambda n, h: None)
NOT_A_RECIPE = {"name": "fake"}
'''


def test_site_plugins_load_and_broken_ones_are_skipped(isolated_registry, tmp_path, monkeypatch, caplog):
    (tmp_path / "medveil_test_plugin.py").write_text(PLUGIN_SOURCE)
    (tmp_path / "medveil_broken_plugin.py").write_text("raise RuntimeError('plugin bug')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    group = registry.ENTRY_POINT_GROUP
    points = [
        metadata.EntryPoint(name="good", value="medveil_test_plugin:RECIPE", group=group),
        metadata.EntryPoint(name="raises", value="medveil_broken_plugin:RECIPE", group=group),
        metadata.EntryPoint(name="missing", value="medveil_no_such_module:RECIPE", group=group),
        metadata.EntryPoint(name="wrong_type", value="medveil_test_plugin:NOT_A_RECIPE", group=group),
        metadata.EntryPoint(name="shadow", value="medveil_test_plugin:SHADOW", group=group),
    ]
    with caplog.at_level(logging.ERROR, logger="medveil.models.registry"):
        assert load_plugins(points) == ["site-plugin@3"]
    assert get_model("site-plugin").version == "3"
    assert get_model("logistic") is LOGISTIC  # the shadowing plugin did not replace the built-in
    skipped = {record.getMessage().split("'")[1] for record in caplog.records}
    assert skipped == {"raises", "missing", "wrong_type", "shadow"}


def test_default_plugin_scan_reads_the_entry_point_group(monkeypatch, isolated_registry):
    asked = []

    def entry_points(**selection):
        asked.append(selection)
        return [metadata.EntryPoint(name="bad", value="medveil_no_such_module:X", group=selection["group"])]

    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(registry.metadata, "entry_points", entry_points)
    assert load_plugins() == []
    assert load_plugins() == []  # once per process
    assert asked == [{"group": "medveil.models"}]

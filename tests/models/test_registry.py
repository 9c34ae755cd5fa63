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
    assert {("logistic", "1"), ("mlp", "1")} <= set(registered_models())
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


def test_builtins_give_one_logit_per_row():
    torch = pytest.importorskip("torch")
    for recipe, hyper in ((LOGISTIC, NoHyper()), (MLP, MLP.Hyper(hidden=[5, 3], dropout=0.5))):
        module = recipe.build(4, hyper)
        module.eval()
        assert module(torch.zeros(7, 4)).shape == (7,)
        assert module(torch.zeros(1, 4)).shape == (1,)
    with pytest.raises(ValueError):
        LOGISTIC.build(0, NoHyper())


def test_import_needs_no_torch():
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # any `import torch` now fails
        import medveil.models as models
        import medveil.models.partition
        assert models.get_model("mlp").key == "mlp@1"
        models.MLP.Hyper(hidden=[8])
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

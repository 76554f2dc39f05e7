"""Every shipped recipe loads and validates over the defaults; a recipe's errors name the recipe and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

RECIPES = sorted((Path(__file__).resolve().parents[1] / "examples" / "recipes").glob("*.yaml"))


def test_recipes_exist():
    assert len(RECIPES) >= 13


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_loads(path):
    import yaml

    from tunepath.params import load_recipe

    cfg = load_recipe(path)
    written = yaml.safe_load(path.read_text(encoding="utf-8"))
    for section, values in written.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value or str(getattr(getattr(cfg, section), key)) == str(value), (section, key)


def test_recipe_over_defaults_then_overrides(tmp_path):
    from tunepath.config import Config
    from tunepath.params import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_steps: 7\n  lora_r: 4\n", encoding="utf-8")
    cfg = load_recipe(recipe, ["train.lora_r=8"])
    assert (cfg.train.max_steps, cfg.train.lora_r) == (7, 8)
    assert cfg.train.learning_rate == Config().train.learning_rate


def test_recipe_errors_name_the_file_and_key(tmp_path):
    from tunepath.params import ConfigError, load_recipe

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  max_stepz: 7\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml: train\.max_stepz: unknown key"):
        load_recipe(recipe)
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_params_round_trip_keeps_the_file(tmp_path):
    """Writing the effective values back changes only the values that differ, in the file's own style."""
    from tunepath.params import load_config, render_defaults, write_params

    path = tmp_path / "params.yaml"
    path.write_text(render_defaults(), encoding="utf-8")
    before = path.read_text(encoding="utf-8").splitlines()
    assert write_params(path, load_config(path)) == []
    write_params(path, load_config(path, ["train.max_steps=20", "train.target_modules=[q_proj, v_proj]"]))
    after = path.read_text(encoding="utf-8").splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 2
    assert any("target_modules: [q_proj, v_proj]" in b for _, b in changed)
    assert all("null" in a for a in before if ": null" in a) and sum(": null" in a for a in after) == sum(": null" in a for a in before)

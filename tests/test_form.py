"""The Prefect run form of `finetune`, read from the JSON schema Prefect generates for the flow's parameters (what
its UI draws): the fields a person changes first come first, the demo's last, and nothing a user may set is a
`const` (drawn as "is a const and cannot be changed"). The recipe parameter merges like `tunepath run --config`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def schema() -> dict:
    from prefect.utilities.callables import parameter_schema

    from flows.finetune import finetune

    return parameter_schema(finetune).model_dump_for_openapi()


def form_fields(schema: dict) -> list[str]:
    """Every leaf field of the `config` parameter as the form lists them: each object's fields by `position`."""
    defs = schema["definitions"]

    def walk(props: dict, prefix: str) -> list[str]:
        out = []
        for name, prop in sorted(props.items(), key=lambda kv: kv[1]["position"]):
            ref = prop.get("$ref") or next((b["$ref"] for b in prop.get("allOf", []) if "$ref" in b), None)
            target = defs[ref.rsplit("/", 1)[1]] if ref else prop
            out += walk(target["properties"], f"{prefix}{name}.") if "properties" in target else [f"{prefix}{name}"]
        return out

    return walk(defs["Config"]["properties"], "")


def test_the_recipe_comes_first_then_the_config(schema):
    positions = {name: prop["position"] for name, prop in schema["properties"].items()}
    assert sorted(positions, key=positions.get)[:2] == ["recipe", "config"]
    assert schema["properties"]["recipe"]["type"] == "string"  # a plain text box, no None toggle
    assert "examples/recipes/" in schema["properties"]["recipe"]["description"]


def test_the_fields_a_person_changes_first_lead_the_form(schema):
    fields = form_fields(schema)
    data = [f for f in fields if f.startswith("data.")]
    assert fields[0] == "data.raw_dir" and fields[: len(data)] == data  # the data folder, then its resources
    n = len(data)
    assert fields[n : n + 3] == ["model.base", "model.chat_variant", "model.trust_remote_code"]
    assert fields[n + 3 : n + 7] == ["train.max_steps", "train.learning_rate", "train.lora_r", "train.batch_size"]
    assert fields.index("train.max_steps") < 10  # after the data folder, its resources and engine, and the model
    train = [f for f in fields if f.startswith("train.")]
    assert fields.index("tokenize.max_length") == fields.index(train[-1]) + 1  # right after the train section
    tokenize = [f for f in fields if f.startswith("tokenize.")]
    assert fields.index("route.force_method") == fields.index(tokenize[-1]) + 1  # the route section's first, after tokenize
    assert all(f.startswith("demo.") for f in fields[-14:]) and not any(f.startswith("demo.") for f in fields[:-14])
    # the same fields as params.yaml, which keeps its own order
    from tunepath.config import Config

    declared = [f"{s}.{k}" for s, field in Config.model_fields.items() for k in field.annotation.model_fields]
    keys = list(dict.fromkeys(".".join(f.split(".")[:2]) for f in fields))  # evaluate.judge.* is one key of params.yaml
    assert sorted(keys) == sorted(declared) and keys != declared


def test_sections_are_numbered_in_working_order_and_the_advanced_parts_say_so(schema):
    """Prefect's form cannot fold a section away: the titles it draws say what is basic and what is advanced."""
    defs = schema["definitions"]
    sections = sorted(defs["Config"]["properties"].items(), key=lambda kv: kv[1]["position"])
    assert [prop["title"] for _, prop in sections] == [
        "1 · Data", "2 · Model", "3 · Train", "4 · Tokenize", "5 · Route", "Advanced · Validate", "Advanced · Evaluate",
        "Advanced · Merge", "Advanced · Register", "Advanced · Promote", "Demo only · Demo"]
    train = sorted(defs["TrainConfig"]["properties"].items(), key=lambda kv: kv[1]["position"])
    titles = [prop["title"] for _, prop in train]
    basics = [t for t in titles if not t.startswith("Advanced · ")]
    assert titles[: len(basics)] == basics and basics[:3] == ["Max Steps", "Learning Rate", "Lora R"]  # basics, then advanced only
    assert "Advanced · Weight Decay" in titles and len(titles) > len(basics)
    data = {k: p["title"] for k, p in defs["DataConfig"]["properties"].items()}
    assert [k for k, t in data.items() if t.startswith("Advanced · ")] == ["engine", "ray_address"]  # Ray: past one machine


def test_every_field_has_a_position_for_the_form_to_sort_by(schema):
    # a server that stores the schema as JSONB reorders its keys: the position is what keeps the order
    for name, definition in schema["definitions"].items():
        positions = [p.get("position") for p in definition.get("properties", {}).values()]
        assert None not in positions and sorted(positions) == list(range(len(positions))), name


def test_no_field_is_a_const(schema):
    text = json.dumps(schema)
    assert '"const"' not in text
    train = schema["definitions"]["TrainConfig"]["properties"]
    assert train["compile"]["enum"] == ["auto", True, False] and "anyOf" not in train["compile"]
    assert [b.get("type") for b in train["num_processes"]["anyOf"]] == ["integer", "string"]
    assert train["num_processes"]["anyOf"][1] == {"enum": ["auto"], "title": "auto", "type": "string"}


def test_an_optional_text_or_number_is_one_plain_input(schema):
    """`str | None`, `int | None`, `float | None`: one input of that type (no str/None toggle) that may be left
    empty; a choice or list that may be None keeps its None side (None is no empty input there)."""
    defs = schema["definitions"]
    plain = {("ModelConfig", "chat_variant"): "string", ("TokenizeConfig", "custom_template"): "string",
             ("TokenizeConfig", "cache_dir"): "string", ("JudgeConfig", "base_url"): "string",
             ("DataConfig", "num_proc"): "integer", ("RouteConfig", "gpus"): "integer", ("RouteConfig", "gpu_memory_gb"): "number",
             ("RouteConfig", "time_budget_hours"): "number"}
    for (model, name), kind in plain.items():
        prop = defs[model]["properties"][name]
        assert prop["type"] == kind and "anyOf" not in prop and "default" not in prop, (model, name, prop)
    assert defs["RouteConfig"]["properties"]["gpu_memory_gb"]["exclusiveMinimum"] == 0  # its bounds stay
    for model, name in [("RouteConfig", "force_method"), ("RouteConfig", "force_stages"), ("ValidateConfig", "control_tokens")]:
        assert {"type": "null"} in defs[model]["properties"][name]["anyOf"], (model, name)


@pytest.mark.parametrize("edit", [{}, {"model": {"chat_variant": "models/chat"}}, {"route": {"gpu_memory_gb": 24.0, "gpus": 2}},
                                  {"data": {"num_proc": 4}}, {"tokenize": {"cache_dir": None}}])
def test_optional_fields_empty_or_set_pass_prefects_check_and_the_config(schema, edit):
    """What the form sends: the default's null, a value, or the key left out (an emptied box sends nothing)."""
    from prefect.utilities.schema_tools import validate

    from tunepath.config import Config

    config = Config.model_validate(edit).model_dump(mode="json")
    validate({"recipe": "", "config": config}, schema, raise_on_error=True)
    emptied = {**config, "model": {k: v for k, v in config["model"].items() if k != "chat_variant"}}
    validate({"recipe": "", "config": emptied}, schema, raise_on_error=True)
    assert Config.model_validate(emptied).model.chat_variant is None
    assert Config.model_validate(config).model_dump(mode="json") == config


def test_the_deployments_defaults_pass_prefects_deployment_check(schema, tmp_path):
    """Creating a deployment checks its parameters with Prefect's older validator, which allows no null for a plain
    input (the flow-run check does): the form's defaults leave those nulls out, and still mean params.yaml."""
    import shutil

    from prefect._internal.schemas.validators import validate_values_conform_to_schema

    from tunepath import services
    from tunepath.config import Config
    from tunepath.params import load_config

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    defaults = services.deployment_parameters(tmp_path)["finetune"]
    validate_values_conform_to_schema(defaults, schema, ignore_required=True)
    assert Config.model_validate(defaults["config"]) == load_config(tmp_path / "params.yaml")
    assert "chat_variant" not in defaults["config"]["model"] and defaults["config"]["train"]["max_steps"] is not None
    with pytest.raises(ValueError, match="custom_template"):  # what `prefect deploy` refused before
        validate_values_conform_to_schema({"config": Config().model_dump(mode="json")}, schema, ignore_required=True)


@pytest.mark.parametrize("field, value", [("gpu_memory_gb", -1), ("gpu_memory_gb", "24GB"), ("gpus", 1.5)])
def test_prefects_check_still_refuses_a_bad_optional_value(schema, field, value):
    from prefect.utilities.schema_tools import ValidationError, validate

    from tunepath.config import Config

    config = Config().model_dump(mode="json")
    config["route"][field] = value
    with pytest.raises(ValidationError, match=f"config.route.{field}"):
        validate({"recipe": "", "config": config}, schema, raise_on_error=True)


@pytest.mark.parametrize("train", [{"compile": True}, {"compile": False}, {"compile": "auto"}, {"num_processes": 2}, {"num_processes": "auto"}])
def test_what_the_form_sends_passes_prefects_check_and_the_config(schema, train):
    from prefect.utilities.schema_tools import validate

    from tunepath.config import Config

    config = Config.model_validate({"train": train}).model_dump(mode="json")
    validate({"recipe": "", "config": config}, schema, raise_on_error=True)  # Prefect's server-side parameter check
    assert {k: getattr(Config.model_validate(config).train, k) for k in train} == train


def test_a_recipe_from_the_form_goes_under_the_fields_the_person_changed():
    from flows.finetune import with_recipe
    from tunepath.config import Config
    from tunepath.params import load_recipe

    recipe = load_recipe(REPO / "examples" / "recipes" / "lora_sft.yaml")
    form = Config.model_validate({"train": {"max_steps": 7}, "model": {"base": "models/mine"}})
    config, edits = with_recipe("lora_sft", form, REPO)  # outside a deployment the form's defaults are Config's
    assert edits == ["model.base", "train.max_steps"]
    assert (config.train.max_steps, config.model.base) == (7, "models/mine")
    # everything else is the recipe's, not the form's defaults
    assert config.train.learning_rate == recipe.train.learning_rate != Config().train.learning_rate
    assert config.tokenize.max_length == recipe.tokenize.max_length
    assert config.route.force_method == recipe.route.force_method == "lora"


def test_an_unknown_recipe_names_the_ones_that_exist():
    from flows.finetune import with_recipe
    from tunepath.config import Config
    from tunepath.params import ConfigError

    with pytest.raises(ConfigError, match=r"recipe 'lora-sft': no such file .*the recipes in examples/recipes/ are: .*lora_sft"):
        with_recipe("lora-sft", Config(), REPO)

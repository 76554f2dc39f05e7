"""Reading params.yaml into the typed Config, `--set` overrides, and writing effective values back.

Writing back keeps comments and order (ruamel round-trip), like `dvc exp run --set-param`: the params file
always holds the values of the last run, which is what lets `dvc repro` reproduce it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """params.yaml or an override is wrong; the message names the key and what to do."""


# the generated params.yaml is about 30 KB; a YAML alias bomb of 123 KB expanded to 200 MB and 2 GB of memory
MAX_PARAMS_BYTES = 1_000_000
MAX_PARAMS_NODES = 100_000  # scalars, lists and mappings after every alias is expanded; the generated file has ~1,000


def read_params_text(path: Path) -> str:
    """params.yaml's text, refused before parsing when too large or when its aliases expand past MAX_PARAMS_NODES."""
    import yaml

    size = path.stat().st_size
    if size > MAX_PARAMS_BYTES:
        raise ConfigError(f"{path}: {size:,} bytes, more than the {MAX_PARAMS_BYTES:,} a params file may hold; "
                          "regenerate it with `tunepath params > params.yaml`")
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # nodes only: an alias is one shared node, not a copy
    except yaml.YAMLError:
        return text  # the parse that follows reports it with its line
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a params file") from None
    expanded = _expanded_nodes(root)
    if expanded > MAX_PARAMS_NODES:
        raise ConfigError(f"{path}: its YAML aliases expand to more than {MAX_PARAMS_NODES:,} values; "
                          "write the values out instead of repeating anchors (*alias)")
    return text


def _expanded_nodes(root) -> int:
    """How many nodes the document has once every alias is expanded, counted without expanding (memoised per node)."""
    import yaml

    if root is None:
        return 0
    sizes: dict[int, int] = {}
    stack = [(root, False)]
    while stack:  # post-order, iterative: size(node) = 1 + the sizes of its children
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
            continue
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else list(node.value)
        if done:
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), MAX_PARAMS_NODES + 1)
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def parse_override(text: str) -> tuple[list[str], Any]:
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set train.max_steps=20")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({e.problem})") from e
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {part} is a value, not a section")
        node[path[-1]] = value
    return raw


def build_config(raw: dict, source: str = "params.yaml"):
    """Validate a plain dict into Config; every error names its key path."""
    from pydantic import ValidationError

    from tunepath.config import Config

    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"])
            msg = "unknown key (check the spelling against params.yaml)" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{where}: {msg}")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def load_config(path: Path, overrides: list[str] | None = None):
    if not path.exists():
        raise ConfigError(f"{path}: not found; run from the project folder or pass --params FILE")
    raw = _read_mapping(path, "expected a mapping of sections (data, model, validate, ...)")
    return build_config(apply_overrides(raw, overrides or []), str(path))


def _read_mapping(path: Path, expected: str) -> dict:
    """A params-like YAML file as a dict (bounded by read_params_text); errors name the file and line."""
    import yaml

    try:
        raw = yaml.safe_load(read_params_text(path)) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {expected}, got {type(raw).__name__}")
    return raw


def load_recipe(path: Path, overrides: list[str] | None = None, edits: dict | None = None):
    """A recipe: a partial config (any sections and keys of params.yaml) over the defaults, then `edits` (a partial
    config, what a person changed in the Prefect form), then the overrides.

    The recipe alone says what the run is: params.yaml's earlier values do not leak into it (the run writes the
    effective values back to params.yaml, which is what `dvc repro` reads).
    """
    from tunepath.config import Config

    if not path.exists():
        raise ConfigError(f"--config {path}: not found (recipes ship in examples/recipes/)")
    recipe = _read_mapping(path, "a recipe is a mapping of sections (data, model, train, ...)")
    merged = _deep_merge(_deep_merge(Config().model_dump(mode="json"), recipe), edits or {})
    return build_config(apply_overrides(merged, overrides or []), str(path))


def find_recipe(name: str, root: Path) -> Path:
    """A recipe by path (relative to the project) or by name (`lora_sft` is examples/recipes/lora_sft.yaml)."""
    path = root / name
    if not path.exists() and "/" not in name and not name.endswith((".yaml", ".yml")):
        path = root / "examples" / "recipes" / f"{name}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in (root / "examples" / "recipes").glob("*.yaml"))
        raise ConfigError(f"recipe {name!r}: no such file in {root}; the recipes in examples/recipes/ are: {', '.join(shipped) or 'none'}")
    return path


def changed_values(values: dict, baseline: dict) -> dict:
    """The leaves of `values` that differ from `baseline`, as a partial config (nested like params.yaml)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(baseline.get(key), dict):
            inner = changed_values(value, baseline[key])
            if inner:
                out[key] = inner
        elif key not in baseline or baseline[key] != value:
            out[key] = value
    return out


def leaf_keys(values: dict, prefix: str = "") -> list[str]:
    """`section.key` paths of a partial config."""
    return [k for key, v in values.items() for k in (leaf_keys(v, f"{prefix}{key}.") if isinstance(v, dict) and v else [f"{prefix}{key}"])]


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def write_params(path: Path, config) -> list[str]:
    """Write the config's values into params.yaml where they differ; returns the changed key paths."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096  # long lines stay as written: no re-wrapping diffs
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = yaml.load(read_params_text(path)) if path.exists() else None
    if doc is None:
        from ruamel.yaml.comments import CommentedMap

        doc = CommentedMap()
    changed: list[str] = []
    _merge(doc, config.model_dump(mode="json"), [], changed)
    if changed:
        # written beside and renamed over: a reader (dvc, a stage) never sees a half-written params.yaml
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            yaml.dump(doc, f)
        os.replace(tmp, path)
    return changed


def _merge(doc, values: dict, prefix: list[str], changed: list[str]) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            _merge(doc[key], value, prefix + [key], changed)
        elif key not in doc or doc[key] != value:
            doc[key] = _styled_like(doc.get(key), value)
            changed.append(".".join(prefix + [key]))


def _styled_like(old, value):
    """A new list or mapping written in the flow style ([a, b], {k: v}) of the value it replaces, as the file has it."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    flow = getattr(getattr(old, "fa", None), "flow_style", lambda: False)()
    if isinstance(value, list) and (flow or not isinstance(old, list)):
        seq = CommentedSeq(value)
        seq.fa.set_flow_style()
        return seq
    if isinstance(value, dict) and flow:
        mapping = CommentedMap(value)
        mapping.fa.set_flow_style()
        return mapping
    return value


def render_defaults() -> str:
    """params.yaml with every default and its description as a comment (`tunepath params > params.yaml`)."""
    import json

    from tunepath.config import Config

    lines = ["# tunepath parameters: one section per stage of dvc.yaml. Unknown keys are errors.",
             "# Generated from the typed config (tunepath params); edit values freely, comments explain each knob.", ""]
    defaults = Config().model_dump(mode="json")
    for section, field in Config.model_fields.items():
        lines.append(f"{section}:  # {field.description}")
        model_cls = field.annotation
        for key, sub in model_cls.model_fields.items():
            value = json.dumps(defaults[section][key], ensure_ascii=False)
            lines.append(f"  {key}: {value}  # {sub.description}")
        lines.append("")
    return "\n".join(lines)

"""The order of the config in forms generated from its JSON schema (Prefect's Custom run form): what a person
changes first at the top, the toy demo's settings last. params.yaml keeps the declaration order.

Prefect's form sorts each object's fields by a `position` key (unordered: declaration order, which a server
storing the schema as JSONB would lose), so every field gets one. A union with a literal (`bool | "auto"`,
`int | "auto"`) becomes a choice or a plain branch: Prefect draws `const` as "is a const and cannot be changed".
An optional text or number (`str | None`, `int | None`) becomes one plain input: pydantic's `anyOf [X, null]`
draws a type toggle with a `None` side. Its `default: null` goes too, so that Prefect's parameter check (which
lets a non-required field without a default be null) still accepts the empty value the form sends.

Prefect 3.9's form cannot fold a section away: its default UI draws a nested object as a card, titled by the
property's `title` (else its key, humanized) with its description, fields sorted by `position`; it reads no
collapse or "advanced" hint from the schema (its newer UI neither). So the form says where things are instead:
the sections a person works through are numbered in that order (1 · Data ... 5 · Route), the sections only a
specialist changes come after them titled "Advanced · ..." and the toy demo's last as "Demo only · Demo"; inside
the long sections (train, tokenize, route) the basics come first and every field after them is titled
"Advanced · ...". Titles only: the keys, values and params.yaml stay as they are.
"""

from __future__ import annotations

FIRST = {
    "Config": ("data", "model", "train", "tokenize", "route", "validate", "evaluate", "merge", "register", "promote", "demo"),
    "DataConfig": ("raw_dir", "num_proc", "memory_gb"),  # then the engine: Ray only for past one machine
    "TrainConfig": ("max_steps", "learning_rate", "lora_r", "batch_size", "epochs", "grad_accum", "lora_alpha", "lora_dropout",
                    "target_modules", "lr_scheduler", "warmup_steps", "seed", "precision", "backend", "num_processes"),
    "TokenizeConfig": ("max_length", "template", "pack", "overlong"),
    "RouteConfig": ("force_method", "force_stages", "goal", "gpus", "gpu_memory_gb", "time_budget_hours"),
}


# The config's sections in the form: the five a person works through, numbered; the rest marked.
SECTION_TITLES = {
    "data": "1 · Data", "model": "2 · Model", "train": "3 · Train", "tokenize": "4 · Tokenize", "route": "5 · Route",
    "validate": "Advanced · Validate", "evaluate": "Advanced · Evaluate", "merge": "Advanced · Merge",
    "register": "Advanced · Register", "promote": "Advanced · Promote", "demo": "Demo only · Demo",
}
ADVANCED = "Advanced · "


def form_schema(schema: dict, cls) -> None:
    """pydantic's `json_schema_extra` hook: positions in form order, titles that say which part is advanced, and
    no `const` a user could want to change."""
    properties = schema.get("properties") or {}
    first = [name for name in FIRST.get(cls.__name__, ()) if name in properties]
    order = first + [name for name in properties if name not in first]
    schema["properties"] = {name: properties[name] for name in order}
    for position, name in enumerate(order):
        prop = schema["properties"][name]
        prop["position"] = position
        if cls.__name__ == "Config" and name in SECTION_TITLES:
            prop["title"] = SECTION_TITLES[name]
        elif first and name not in first:
            prop["title"] = ADVANCED + prop.get("title", name.replace("_", " ").title())
        _plain_when_optional(prop)
        _choices_not_consts(prop)


def _plain_when_optional(prop: dict) -> None:
    """`anyOf [{type: string|integer|number, ...}, {type: null}]` with default null: the one type, no toggle.
    Choices (`Literal[...] | None`) and lists keep their None side: there, None is not an empty input."""
    branches = prop.get("anyOf") or []
    if len(branches) != 2 or prop.get("default", None) is not None:
        return
    plain = [b for b in branches if b.get("type") != "null"]
    if len(plain) != 1 or plain[0].get("type") not in ("string", "integer", "number") or "enum" in plain[0] or "const" in plain[0]:
        return
    del prop["anyOf"]
    prop.pop("default", None)
    prop.update(plain[0])


def _choices_not_consts(prop: dict) -> None:
    branches = prop.get("anyOf")
    if not branches:
        if "const" in prop:
            prop["enum"] = [prop.pop("const")]
        return
    consts = [b["const"] for b in branches if "const" in b]
    if consts and all("const" in b or b.get("type") == "boolean" for b in branches):
        # `bool | Literal["auto"]`: one drop-down (auto, true, false) instead of a type toggle
        del prop["anyOf"]
        prop["enum"] = consts + [True, False] * any(b.get("type") == "boolean" for b in branches)
        return
    for b in branches:
        if "const" in b:
            b["enum"] = [b.pop("const")]
            b.setdefault("title", str(b["enum"][0]))  # the toggle's label: `auto`, not `string`

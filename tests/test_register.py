"""Register-stage helpers that need no registry: the hub check, identities, lineage records.
(Registration itself, its tags, idempotency and serving are tested in test_promote.py on a real registry.)"""

from __future__ import annotations

import json

import pytest

from tunepath.register.hub import hub_references, looks_like_hub_id
from tunepath.register.stage import artifact_hash, flatten, tokenizer_hash


@pytest.mark.parametrize("value, hub", [
    ("Qwen/Qwen2.5-0.5B", True), ("gpt2", True), ("/srv/models/merge/model", False), ("./models/demo", False),
    ("~/models/x", False), ("C:\\models\\x", False),
])
def test_hub_ids_are_told_from_local_paths(value, hub):
    assert looks_like_hub_id(value) is hub


def test_hub_references_name_what_would_need_network(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen2.5-0.5B",
                                                       "auto_map": {"AutoModel": "someone/repo--modeling.Model"}}))
    problems = hub_references({"source_model_name": "Qwen/Qwen2.5-0.5B", "source_model_revision": "abc"}, tmp_path)
    assert len(problems) == 4 and any("auto_map" in p for p in problems)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    assert hub_references({"source_model_name": str(tmp_path)}, tmp_path) == []


def test_identities_follow_the_bytes(tmp_path):
    for name, text in (("tokenizer.json", "{}"), ("chat_template.jinja", "A"), ("model.safetensors", "w")):
        (tmp_path / name).write_text(text)
    weights, tokens = artifact_hash(tmp_path), tokenizer_hash(tmp_path)
    (tmp_path / "model.safetensors").write_text("w2")
    assert artifact_hash(tmp_path) != weights and tokenizer_hash(tmp_path) == tokens
    (tmp_path / "chat_template.jinja").write_text("B")
    assert tokenizer_hash(tmp_path) != tokens


def test_params_flatten_to_dotted_keys():
    assert flatten({"train": {"lora_r": 16, "target_modules": ["q", "v"]}, "seed": 0}) == {
        "train.lora_r": "16", "train.target_modules": "['q', 'v']", "seed": "0"}


def test_dvc_source_says_how_to_get_the_data_back():
    from tunepath.register.datasets import dvc_source

    source = dvc_source("data/raw", "0123456789abcdef0123456789abcdef.dir", "abc123")
    assert source.to_dict()["dvc_file"] == "data/raw.dvc" and source._get_source_type() == "dvc"
    with pytest.raises(NotImplementedError, match="dvc pull data/raw.dvc"):
        source.load()


def test_artifacts_stay_local_for_file_stores_and_with_the_server_otherwise(tmp_path):
    from tunepath.registry import artifact_location

    assert artifact_location(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlartifacts") == (tmp_path / "mlartifacts").as_uri()
    assert artifact_location("http://127.0.0.1:5000", tmp_path / "mlartifacts") is None
    assert artifact_location("https://mlflow.example.org", tmp_path) is None

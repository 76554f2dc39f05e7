"""Helpers for the train tests (no tests here): a tokenized demo project, plans, runs and model probes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

LN2 = math.log(2)


def one_thread():
    """Generator for a module fixture: torch on one thread, restored after.

    On the tiny model, intra-op threads cost more than they give on a shared CPU (measured 10x slower with 2
    threads under load), and float sums are only bit-identical across runs with the same thread count.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Module fixture (imported by each train test module): torch on one thread for the module's tests."""
    yield from one_thread()


@pytest.fixture(scope="module")
def project(tmp_path_factory, demo_assets):
    """Module fixture: a tokenized demo project shared by the module's tests."""
    return tokenized_project(tmp_path_factory.mktemp("train-project"), demo_assets)


def tokenized_project(dest: Path, assets: Path) -> Path:
    """The demo data and model in `dest`, run through the real validate and tokenize stages."""
    from tunepath.config import Config
    from tunepath.stages import Workspace, run_stage

    shutil.copytree(assets / "data", dest / "data")
    shutil.copytree(assets / "models", dest / "models")
    ws = Workspace(dest, "")
    for stage in ("validate", "tokenize"):
        run_stage(stage, Config(), ws)
    return dest


def write_plan(path: Path, stages: list[str], method: str, start_from: str = "base") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"stages": stages, "method": method, "start_from": start_from}), encoding="utf-8")
    return path


def small_config(**overrides):
    from tunepath.train import TrainConfig

    values = {"max_steps": 6, "batch_size": 4, "learning_rate": 5e-3, "warmup_steps": 0, "lr_scheduler": "constant"}
    values.update(overrides)
    return TrainConfig(**values)


def train(project: Path, run_dir: Path, stages: list[str], method: str, start_from: str = "base", **kwargs) -> dict:
    """run_train on the project's tokenized data into `run_dir/train` (checkpoints in `run_dir/checkpoints/train`)."""
    from tunepath.sections import ModelConfig
    from tunepath.train.stage import run_train

    cfg = kwargs.pop("cfg", None) or small_config()
    plan = write_plan(run_dir / "plan.json", stages, method, start_from)
    model = ModelConfig(base=str(project / "models" / "demo"))
    return run_train(cfg, model, plan, project / "artifacts" / "tokenize", run_dir / "train", **kwargs)


def curve(run_dir: Path, columns: int = 5) -> list[list[str]]:
    """loss.csv without the timing column (tokens/s differs between runs by nature)."""
    lines = (run_dir / "train" / "loss.csv").read_text(encoding="utf-8").splitlines()
    return [line.split(",")[:columns] for line in lines]


def load_trained(run_dir: Path):
    """The trained model from the artifacts, the way evaluate and merge load it (fp32)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train_dir = run_dir / "train"
    summary = json.loads((train_dir / "metrics.json").read_text(encoding="utf-8"))
    if summary["weights"] == "adapter":
        base = AutoModelForCausalLM.from_pretrained(summary["start_model"], dtype="float32")
        return PeftModel.from_pretrained(base, str(train_dir / "adapter"))
    return AutoModelForCausalLM.from_pretrained(str(train_dir / "model"), dtype="float32")


def load_start(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="float32")


def lm_loss(model, project: Path, folder: str, rows: int = 16) -> float:
    """Mean label-token loss on the first rows of a tokenized train split (a fixed batch)."""
    import torch
    import torch.nn.functional as F
    from datasets import load_from_disk

    from tunepath.collate import PadCollator

    data = load_from_disk(str(project / "artifacts" / "tokenize" / folder / "train"))
    batch = PadCollator(0)(list(data.select(range(rows))))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits.float()
    labels = batch["labels"][:, 1:]
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100))


def preference_margin(model, project: Path, pairs: int = 16) -> float:
    """Mean log p(chosen) - log p(rejected) over the first preference pairs."""
    import torch
    from datasets import load_from_disk

    from tunepath.train.dpo import PairCollator, sequence_logps

    data = load_from_disk(str(project / "artifacts" / "tokenize" / "dpo" / "train")).select(range(pairs))
    batch = PairCollator(0)(list(data))
    model.eval()
    with torch.no_grad():
        logps = sequence_logps(model, batch)
    return float((logps[:pairs] - logps[pairs:]).mean())

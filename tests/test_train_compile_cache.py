"""train.compile's cache across runs (tunepath/train/compile_cache.py): torch's caches go to the project's folder,
the dynamic-shape profile is named by the model's shapes, and a second process compiling the same shapes loads
its graphs from the cache instead of compiling them (slow tier: two real compiles on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]


def _tiny(hidden: int = 64):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=hidden, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=300, use_cache=False))


@pytest.fixture
def fresh_compiler_config(monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with torch.compiler.config.patch(job_id=None):  # torch's config modules restore themselves this way
        yield


def test_use_points_torchs_caches_at_the_folder_and_names_the_profile(tmp_path, fresh_compiler_config):
    from tunepath.train import compile_cache

    folder = tmp_path / ".tunepath" / "compile-cache"
    info = compile_cache.use(folder, _tiny())
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder.resolve()) and folder.is_dir()
    assert torch.compiler.config.job_id == info["job_id"] and info["job_id"].startswith("tunepath-")
    assert info["files_before"] == 0
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(folder.resolve())  # where inductor writes its FX graphs, kernels and autotuning


def test_a_cache_folder_the_user_set_wins(tmp_path, monkeypatch, fresh_compiler_config):
    from tunepath.train import compile_cache

    theirs = tmp_path / "theirs"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(theirs))
    info = compile_cache.use(tmp_path / "ours", _tiny())
    assert info["folder"] == str(theirs) and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(theirs)
    assert not (tmp_path / "ours").exists()


def test_the_profile_name_follows_the_shapes_not_the_weights():
    from peft import LoraConfig, get_peft_model

    from tunepath.train.compile_cache import job_id

    a, b = _tiny(), _tiny()
    with torch.no_grad():
        b.model.embed_tokens.weight.add_(1.0)  # other weights, same shapes
    assert job_id(a) == job_id(b)
    assert job_id(_tiny(hidden=128)) != job_id(a)  # a profile of other shapes would mark the hidden size dynamic
    lora = get_peft_model(_tiny(), LoraConfig(r=4, target_modules="all-linear"))
    assert job_id(lora) != job_id(a)  # other trainable parts, other backward graphs


CHILD = r"""
import json, sys
import torch
from tunepath.train import TrainConfig, compile_cache, speed
from tunepath.train.options import EngineOptions
from transformers import Qwen2Config, Qwen2ForCausalLM
torch.manual_seed(0)
model = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=300, use_cache=False))
applied = speed.apply(model, TrainConfig(compile=True, chunked_loss=False, attention="sdpa"), "hf", EngineOptions(compile_cache=sys.argv[1]))
ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
loss = model(input_ids=ids, labels=ids).loss
loss.backward()
print("RESULT " + json.dumps({"applied": applied, "hits": compile_cache.hits(), "loss": loss.item()}))
"""


def _compile_once(folder: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, env=env, cwd=str(REPO), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_a_second_run_of_the_same_shapes_compiles_from_the_cache(tmp_path):
    folder = tmp_path / "compile-cache"
    cold = _compile_once(folder)
    assert cold["applied"]["compiled_layers"] == 2 and cold["applied"]["compile_cache"]["files_before"] == 0
    assert cold["hits"]["fxgraph_cache_miss"] > 0 and cold["hits"]["fxgraph_cache_hit"] == 0
    warm = _compile_once(folder)
    assert warm["applied"]["compile_cache"]["files_before"] > 0
    assert warm["hits"]["fxgraph_cache_hit"] > 0 and warm["hits"]["fxgraph_cache_miss"] == 0, warm["hits"]
    assert warm["loss"] == pytest.approx(cold["loss"], abs=1e-6)


def test_the_benchmark_passes_its_switches_as_engine_options(tmp_path):
    from benchmarks.train_gpu import engine_options, variant_spec, with_cache_runs
    from tunepath.train.options import EngineOptions

    def options(variant):
        return engine_options(variant_spec(variant)[1], tmp_path, "tiny", variant)

    assert options("b_gc") == EngineOptions()
    assert options("bq_gc+upcast=true+loss_chunk_mb=64") == EngineOptions(upcast_float_params=True, loss_chunk_bytes=64 << 20)
    assert options("b_gc+checkpoint_offload=true+offload_prefetch=0").offload_prefetch is False
    assert with_cache_runs(["a", "b", "b_compile"]) == ["a", "b", "b_compile+compile_cache=cold", "b_compile+compile_cache=warm"]
    with pytest.raises(SystemExit, match="run b_compile\\+compile_cache=cold first"):
        options("b_compile+compile_cache=warm")
    cold = options("b_compile+compile_cache=cold").compile_cache
    cold.mkdir(parents=True)
    assert options("b_compile+compile_cache=warm").compile_cache == cold  # the warm run reads what the cold one wrote
    (cold / "stale").write_text("x")
    assert not options("b_compile+compile_cache=cold").compile_cache.exists()  # a cold run starts empty

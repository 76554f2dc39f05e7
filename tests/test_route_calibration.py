"""The route's memory and speed model against what the GPU benchmark measured.

Every peak in benchmarks/results/train_<card>_*.json (torch's peak allocated memory, GiB) of a tunepath variant
is compared with the estimate for the same shape and knobs, without route.overhead_gb (the CUDA context that
torch's counter leaves out): within 15% of each. The 7B rows of the benchmark issue (2026-12-01, one H200,
no result file yet) and one 1.5B full fine-tuning run whose file was lost are below by hand; a result file
with the same shape and variant replaces them. So are two full fine-tuning peaks measured before the speed
paths (docs/routing.md's table: transformers' own loss, no compile).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.train_gpu import QWEN2, SHAPES, TUNEPATH_VARIANTS, variant_spec
from tunepath.route import RouteConfig, parse_profile
from tunepath.route.memory import CHUNK_BYTES, GB, Knobs, breakdown
from tunepath.route.speed import MEASURED, path_of

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
TOLERANCE = 0.15
GIB = 2**30

OLD_CHUNK = 1 << 30  # the chunked loss's chunk of the runs before the result files record it
QWEN7 = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, vocab_size=152064, tie_word_embeddings=False)
ISSUE_ROWS = [  # (shape, variant, parameters, micro-batch rows, peak GiB, loss chunk): the benchmark issue's 7B tables
    ("7b", "b_compile", 7_615_616_512, 4, 56.3, OLD_CHUNK),
    ("7b", "b_gc", 7_615_616_512, 4, 19.7, OLD_CHUNK),
    ("7b", "bq", 7_615_616_512, 4, 67.1, OLD_CHUNK),
    ("7b", "cq", 7_615_616_512, 4, 36.0, OLD_CHUNK),
    # 2026-12-02, one H200: the run's log line; its result file was lost to the GPU machine's full disk
    ("1.5b", "b_full", 1_543_714_304, 4, 46.92, CHUNK_BYTES),
]
# (name, shape, parameters, knobs, peak GB): docs/routing.md, full fine-tuning in fp32 under bf16 autocast, batch 1
FULL_ROWS = [
    ("qwen2.5-1.5b-full", dict(SHAPES["1.5b"], tie_word_embeddings=True), 1_543_714_304, 32.39),
    ("tinyllama-1.1b-full", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, vocab_size=32000,
                                 tie_word_embeddings=False), 1_100_048_384, 22.07),
]
KNOWN_KEYS = {"backend", "method", "compile", "micro_batch_tokens", "gradient_checkpointing", "chunked_loss", "attention",
              "checkpoint_offload", "loss_chunk_mb", "upcast", "offload_prefetch", "compile_cache",
              "attention_in_graph", "tf32"}  # the last two change no tensor kept: same peaks measured with and without


def measured_points() -> list:
    points, seen = [], set()
    for path in sorted(RESULTS.glob("train_*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        for shape, runs in data.get("runs", {}).items():
            for variant, run in runs.items():
                if variant_spec(variant)[0] not in TUNEPATH_VARIANTS or "peak_gib" not in run or "error" in run:
                    continue  # the hand-written baseline and the peers are not tunepath's to estimate
                params = data["params"][shape]
                points.append(pytest.param(shape, variant, params, knobs_of(variant, run), run["peak_gib"],
                                           id=f"{path.stem}-{variant}"))
                seen.add((shape, variant))
    for shape, variant, params, rows, peak, chunk in ISSUE_ROWS:
        if (shape, variant) not in seen:
            k = knobs_of(variant, {"micro_batch": [rows], "loss_chunk_bytes": chunk})
            points.append(pytest.param(shape, variant, params, k, peak, id=f"issue-{shape}-{variant}"))
    return points


def shape_of(name: str) -> dict:
    if name in SHAPES:
        return {**SHAPES[name], "tie_word_embeddings": SHAPES[name].get("tie_word_embeddings", QWEN2["tie_word_embeddings"])}
    if name == "7b":
        return QWEN7
    raise AssertionError(f"shape {name!r} of a result file is not in benchmarks/train_gpu.py's SHAPES")


def profile_of(shape: dict, params: float):
    return parse_profile({
        "data": {"labeled_examples": 1000, "unlabeled_tokens": 0, "preference_pairs": 0},
        "resources": {"gpus": 1, "gpu_memory_gb": 141},
        "model": {"params_b": params / 1e9, "hidden_size": shape["hidden_size"], "num_layers": shape["num_hidden_layers"],
                  "intermediate_size": shape["intermediate_size"], "vocab_size": shape["vocab_size"],
                  "tied_embeddings": shape["tie_word_embeddings"]},
    })


def knobs_of(variant: str, run: dict) -> Knobs:
    """The knobs a result file's run trained with: its variant's settings, and what the run says the code did
    (runs from before the file recorded it: 1 GiB loss chunks, and peft's fp32 upcast on hf QLoRA)."""
    _base, spec = variant_spec(variant)
    unknown = set(spec) - KNOWN_KEYS
    assert not unknown, f"variant {variant} sets {unknown}: teach tunepath/route/memory.py what they do to memory"
    method, backend = spec.get("method", "lora"), spec.get("backend", "hf")
    return Knobs(method=method, gradient_checkpointing=spec.get("gradient_checkpointing", False),
                 rows=run["micro_batch"][0], max_length=2048, backend=backend, compile=spec.get("compile", False),
                 chunked_loss=spec.get("chunked_loss", True), offload=bool(spec.get("checkpoint_offload", False)),
                 loss_chunk_bytes=run.get("loss_chunk_bytes", OLD_CHUNK),
                 prefetch=bool(spec.get("offload_prefetch", run.get("offload_prefetch", False))),  # no prefetch before the files record it
                 fp32_embeddings=method == "qlora" and backend == "hf" and run.get("qlora_upcast", True))


def estimate_gb(profile, k: Knobs) -> float:
    cfg = RouteConfig()
    parts = breakdown(profile, cfg, k)
    return sum(parts.values()) - cfg.overhead_gb


def steady_rate(run: dict) -> float:
    """Real tokens per step over the median step time: a recompile inside a short timed window does not count."""
    return run.get("steady_tokens_per_s") or run["real_tokens_per_step"] / run["median_step_s"]


@pytest.mark.parametrize("shape, variant, params, knobs, peak_gib", measured_points())
def test_estimate_within_15_percent_of_each_measured_peak(shape, variant, params, knobs, peak_gib):
    peak = peak_gib * GIB / GB
    est = estimate_gb(profile_of(shape_of(shape), params), knobs)
    assert abs(est - peak) <= TOLERANCE * peak, f"{shape} {variant}: estimate {est:.2f} GB, measured {peak:.2f} GB"


@pytest.mark.parametrize("name, shape, params, peak", FULL_ROWS, ids=[r[0] for r in FULL_ROWS])
def test_full_fine_tuning_within_15_percent(name, shape, params, peak):
    k = Knobs(method="full", gradient_checkpointing=False, rows=1, max_length=2048, compile=False, chunked_loss=False)
    est = estimate_gb(profile_of(shape, params), k)
    assert abs(est - peak) <= TOLERANCE * peak, f"{name}: estimate {est:.2f} GB, measured {peak:.2f} GB"


def test_the_files_cover_several_shapes_and_paths():
    points = measured_points()
    assert len({p.values[0] for p in points}) >= 3 and len({p.values[1] for p in points}) >= 6


def test_speed_table_matches_the_result_files():
    """route/speed.py's MEASURED holds the mean steady tokens/s of the files' runs of each path and shape (within 5%)."""
    runs_of: dict[tuple, list[float]] = {}
    for path in sorted(RESULTS.glob("train_*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        rate = data.get("matmul", {}).get("tflops")
        for shape, runs in data.get("runs", {}).items():
            for variant, run in runs.items():
                if variant_spec(variant)[0] not in TUNEPATH_VARIANTS or run.get("device") != "cuda" or rate is None:
                    continue
                if "speed_excluded" in run:
                    continue  # the file says why its window cannot be timed
                k = knobs_of(variant, run)
                if not k.chunked_loss:
                    continue  # b_plain (packing only) is not a train-stage path
                name, _ = path_of(k)
                runs_of.setdefault((name, data["params"][shape], k.tokens, f"{path.name} {shape} {variant}"), []).append(steady_rate(run))
    merged: dict[tuple, list[float]] = {}
    for (name, params, tokens, _where), rates in runs_of.items():
        merged.setdefault((name, params, tokens), []).extend(rates)
    for (name, params, tokens), rates in merged.items():
        table = [n for p, t, n, _r in MEASURED[name] if p == params and t == tokens]
        assert table, f"{name} at {params:,} parameters, {tokens} tokens: no entry in route/speed.py"
        assert table[0] == pytest.approx(sum(rates) / len(rates), rel=0.05), f"{name} {params:,} {tokens}: runs {rates}"
    assert len(merged) >= 8
    assert all(rows for rows in MEASURED.values())  # every path has a measurement (at any micro-batch: see utilisation)


def test_the_prefetched_inputs_are_the_train_stage_s():
    from tunepath.route.memory import PREFETCHED_INPUTS
    from tunepath.train.offload import MAX_PREFETCHED

    assert PREFETCHED_INPUTS == MAX_PREFETCHED


def test_the_loss_chunk_is_the_train_stage_s():
    from tunepath.train.loss import CHUNK_BYTES as TRAIN_CHUNK

    assert CHUNK_BYTES == TRAIN_CHUNK


def test_a_path_follows_its_base_where_it_was_not_measured():
    """hf QLoRA with checkpointing was measured at 7B and 14B only: at 1.5B it is hf QLoRA's measured u times
    the slowdown checkpointing showed at 7B, not 7B's u kept (which put it above LoRA at 1.5B). Where a path
    was measured, its u is the measurement's."""
    from tunepath.route.speed import utilisation

    at_7b = MEASURED["hf-qlora+checkpointing"][0]
    assert at_7b[0] == 7_615_616_512
    direct = at_7b[2] * 4 * at_7b[0] / (at_7b[3] * 1e12)
    assert utilisation("hf-qlora+checkpointing", at_7b[0]) == pytest.approx(direct)
    slowdown = direct / utilisation("hf-qlora", at_7b[0])
    small = 1_543_714_304
    assert utilisation("hf-qlora+checkpointing", small) == pytest.approx(slowdown * utilisation("hf-qlora", small))
    assert utilisation("hf-qlora+checkpointing", small) < utilisation("hf-qlora", small) < utilisation("compiled", small)
    # full training: its own measurement at 1.5B, and above LoRA's u there (its matmuls keep the card busier)
    full = MEASURED["full-compiled"][0]
    assert utilisation("full-compiled", full[0]) == pytest.approx(full[2] * 6 * full[0] / (full[3] * 1e12))
    assert utilisation("full-compiled", full[0]) > utilisation("compiled", full[0])

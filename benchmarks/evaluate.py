"""Evaluation time on the demo: the evaluate stage with batched generation against one prompt at a time, and its
share of a whole demo run (validate → merge, the stage functions called directly).

    python -m benchmarks.evaluate                 # builds the demo in a temporary folder; prints a table,
                                                  # writes benchmarks/results/evaluate_<hardware>_<date>.json
    python -m benchmarks.evaluate --project DIR   # reuse a project that has data/raw and models/demo
    python -m benchmarks.evaluate --scale         # GPU: 1,000 held-out conversations, Qwen2.5-0.5B shape

`--scale` needs only torch, transformers and tokenizers (plus rouge-score and sacrebleu for the metrics part; it
is skipped without them): a random-init Qwen2 of the Qwen2.5-0.5B shape built from its config (nothing
downloaded), bf16 on a GPU, answers 1,000 demo conversations with tunepath's own scoring and generation
functions, batched (16, the default, and 64) against one prompt at a time (timed on `--single` prompts and scaled
to 1,000). Random weights never emit the end-of-turn token, so every answer runs to max_new_tokens: the longest
generation can take, an upper bound for a trained model. The evaluate stage measures two models (base and
tuned), so its time is twice one model's scoring and generation plus the metrics.

Each evaluate variant runs twice on the same trained adapter; the faster run counts. Generation is greedy with the
same max_new_tokens in both variants, so the answers are the same; only the batching differs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def prepare(root: Path) -> None:
    """A project folder with the repo's params, the shipped benchmark tasks, the demo data and model."""
    from tunepath.demo import DemoConfig, build_demo_model, generate_demo_data

    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    if not (root / "evals").exists():
        shutil.copytree(REPO / "evals", root / "evals")
    if not (root / "data" / "raw").exists():
        generate_demo_data(root / "data" / "raw", DemoConfig())
    if not (root / "models" / "demo" / "config.json").exists():
        build_demo_model(root / "models" / "demo", DemoConfig(), sorted((root / "data" / "raw").iterdir()))


def stage_times(root: Path) -> dict[str, float]:
    from tunepath.params import load_config
    from tunepath.stages import Workspace, run_stage

    cfg = load_config(root / "params.yaml")
    ws = Workspace(root, "")
    out = {}
    for name in ("validate", "tokenize", "route", "train", "evaluate", "merge"):
        t = time.perf_counter()
        run_stage(name, cfg, ws)
        out[name] = time.perf_counter() - t
    return out


def evaluate_variant(root: Path, batch: int, repeat: int) -> dict:
    from tunepath.evaluate.stage import run_evaluate
    from tunepath.params import load_config
    from tunepath.stages import resolve_model, Workspace

    cfg = load_config(root / "params.yaml", [f"evaluate.generation_batch_size={batch}"])
    ws = Workspace(root, "")
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        m = run_evaluate(cfg.evaluate, resolve_model(cfg.model, ws), ws.out("validate"), ws.out("tokenize"), ws.out("train"),
                         root / "artifacts" / f"evaluate_b{batch}", root=root)
        runs.append({"stage_s": time.perf_counter() - t, **m["timings"], "answers": m["samples"]})
    return min(runs, key=lambda r: r["stage_s"])


def scale_inputs(n: int, work: Path):
    """`n` demo conversations as the evaluate stage sees them: templated prompt ids (history up to the last assistant
    turn, generation prompt), the reference answer, and the scored row (answer tokens labelled)."""
    import random

    from transformers import AutoTokenizer

    from tunepath.collate import IGNORE_INDEX
    from tunepath.demo import DemoConfig
    from tunepath.demo.data import _conversation
    from tunepath.demo.model import _save_tokenizer, train_tokenizer

    rng = random.Random("benchmark/evaluate")
    chats = [_conversation(rng)["messages"] for _ in range(n)]
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in chats), encoding="utf-8")
    _save_tokenizer(train_tokenizer([corpus], 4096), work / "tokenizer", DemoConfig())
    tok = AutoTokenizer.from_pretrained(str(work / "tokenizer"))
    prompts, references, rows = [], [], []
    for messages in chats:
        prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        answer = tok(messages[-1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        prompts.append(ids)
        references.append(messages[-1]["content"])
        rows.append({"input_ids": ids + answer, "labels": [IGNORE_INDEX] * len(ids) + answer})
    return tok, prompts, references, rows


def scale(n: int, single: int, max_new_tokens: int, shape: str) -> dict:
    """Evaluation of `n` held-out conversations by one random-init model of `shape`; seconds per part."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from benchmarks.train_gpu import QWEN2, SHAPES
    from tunepath.evaluate.samples import generate_batch
    from tunepath.evaluate.scoring import row_logprobs

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    with tempfile.TemporaryDirectory(prefix="tunepath-bench-eval-scale-") as tmp:
        tok, prompts, references, rows = scale_inputs(n, Path(tmp))
    eot, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    config = Qwen2Config(**{**QWEN2, **SHAPES[shape]}, bos_token_id=pad, eos_token_id=eot, pad_token_id=pad)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model = model.to(torch.bfloat16 if cuda else torch.float32).eval()

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    generate = lambda ps, b: generate_batch(model, ps, max_new_tokens, [eot], pad, device, b)  # noqa: E731
    generate(prompts[:16], 16)  # warm-up: kernels, allocator
    out = {"conversations": n, "shape": shape, "parameters": sum(p.numel() for p in model.parameters()),
           "max_new_tokens": max_new_tokens, "prompt_tokens_mean": sum(map(len, prompts)) / n,
           "scored_tokens": sum(sum(x != -100 for x in r["labels"]) for r in rows)}
    say = lambda key: print(f"  {key}: {out[key]:.2f}", flush=True)  # noqa: E731  (a run cut short still shows its parts)
    _, out["scoring_s"] = timed(lambda: row_logprobs(model, rows, pad, 8, device))
    say("scoring_s")
    _, t1 = timed(lambda: generate(prompts[:single], 1))
    out["generation_b1_s"] = t1 * n / single
    say("generation_b1_s")
    answers = {}
    for b in (16, 64):
        answers[b], out[f"generation_b{b}_s"] = timed(lambda: generate(prompts, b))
        say(f"generation_b{b}_s")
    out["generation_b1_measured_prompts"] = single
    out["new_tokens"] = sum(len(ids) for ids, _ in answers[16])
    texts = [tok.decode(ids, skip_special_tokens=True) for ids, _ in answers[16]]
    try:
        from tunepath.evaluate.compare import compare
        from tunepath.evaluate.stats import Bootstrap

        one = {"answers": [{"text": t, "degenerate": False, "stopped_at_eot": False} for t in texts],
               "row_scores": [(-1.0, 1)] * n, "preference": []}
        _, out["metrics_s"] = timed(lambda: compare(one, one, references, Bootstrap(), relevance_metric="rouge_l"))
        say("metrics_s")
    except ImportError as e:  # rouge-score / sacrebleu not installed on this machine
        out["metrics_s"], out["metrics_skipped"] = None, str(e)
    out["evaluate_stage_s"] = 2 * (out["scoring_s"] + out["generation_b16_s"]) + (out["metrics_s"] or 0.0)
    return out


def print_scale(r: dict, train_tokens_per_s: float) -> None:
    n = r["conversations"]
    print(f"\n{n} held-out conversations, {r['shape']} shape ({r['parameters'] / 1e6:.1f}M parameters), "
          f"{r['prompt_tokens_mean']:.0f} prompt tokens on average, {r['max_new_tokens']} new tokens per answer\n")
    print("| what (one model) | seconds | per conversation ms |\n|---|---|---|")
    for label, key in (("answer-only log-likelihood (scoring, batch 8)", "scoring_s"), ("generation, batch 16 (default)", "generation_b16_s"),
                       ("generation, batch 64", "generation_b64_s"),
                       (f"generation, one at a time ({r['generation_b1_measured_prompts']} timed, scaled to {n})", "generation_b1_s"),
                       ("task metrics + bootstrap intervals (CPU)", "metrics_s")):
        if r.get(key) is not None:
            print(f"| {label} | {r[key]:.1f} | {1000 * r[key] / n:.1f} |")
    print(f"\nbatched generation (16) is {r['generation_b1_s'] / r['generation_b16_s']:.1f}x faster than one at a time "
          f"(64: {r['generation_b1_s'] / r['generation_b64_s']:.1f}x)")
    train_s = r["scored_tokens"] / 0.66 / train_tokens_per_s  # train_gpu's data: 66% of tokens carry a label
    print(f"evaluate stage (base + tuned, batch 16): {r['evaluate_stage_s']:.1f} s; one training epoch over the same conversations at "
          f"{train_tokens_per_s:,.0f} tokens/s would take about {train_s:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description="evaluation time on the demo")
    parser.add_argument("--project", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--scale", action="store_true", help="1,000 conversations with a Qwen2.5-0.5B-shaped random model (GPU)")
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--single", type=int, default=100, help="--scale: prompts timed one at a time")
    parser.add_argument("--shape", default="0.5b", help="--scale: a shape of benchmarks/train_gpu.py (tiny, 0.5b, 1.5b)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--train-tokens-per-s", type=float, default=45189.0,
                        help="--scale: training rate to compare with (0.5B b_compile on an H200, benchmarks/README.md)")
    args = parser.parse_args()
    if args.scale:
        import torch

        from tunepath import lineage

        r = scale(args.conversations, args.single, args.max_new_tokens, args.shape)
        print_scale(r, args.train_tokens_per_s)
        hardware = lineage.hardware()
        out = REPO / "benchmarks" / "results" / f"evaluate_scale_{args.shape}_{hardware.split(' (')[0].replace(' ', '-')}_{dt.date.today()}.json"
        out.write_text(json.dumps({"hardware": hardware, "torch": torch.__version__, **r}, indent=2) + "\n")
        print(f"written: {out.relative_to(REPO)}")
        return

    import torch

    from tunepath import lineage

    with tempfile.TemporaryDirectory(prefix="tunepath-bench-eval-") as tmp:
        root = args.project or Path(tmp) / "project"
        prepare(root)
        stages = stage_times(root)
        variants = {f"batch {b}": evaluate_variant(root, b, args.repeat) for b in (16, 1)}
    whole = sum(stages.values())
    rows = [("evaluate stage in the run", stages["evaluate"], stages["evaluate"] / whole)]
    for name, v in variants.items():
        rows.append((f"evaluate, generation {name}", v["stage_s"], v["stage_s"] / whole))
        rows.append((f"  of which generation ({v['answers']} prompts x 2 models)", v["generation_s"], v["generation_s"] / whole))
        rows.append(("  of which benchmarks (lm-eval)", v["benchmarks_s"], v["benchmarks_s"] / whole))
    print(f"\nwhole demo run validate..merge: {whole:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in stages.items())})\n")
    print("| what | seconds | share of the run |\n|---|---|---|")
    for label, seconds, share in rows:
        print(f"| {label} | {seconds:.2f} | {share:.0%} |")
    speedup = variants["batch 1"]["generation_s"] / max(variants["batch 16"]["generation_s"], 1e-9)
    print(f"\nbatched generation (16) is {speedup:.1f}x faster than one prompt at a time")
    hardware = lineage.hardware()
    out = REPO / "benchmarks" / "results" / f"evaluate_{hardware.split(' (')[0].replace(' ', '-')}_{dt.date.today()}.json"
    out.write_text(json.dumps({"hardware": hardware, "torch_threads": torch.get_num_threads(), "stages_s": stages,
                               "whole_run_s": whole, "variants": variants, "generation_speedup": speedup}, indent=2) + "\n")
    print(f"written: {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()

"""Benchmark of the tokenize stage against the raw batched fast tokenizer, on the same chats in the same run.

Usage:

    python -m benchmarks.tokenize                       # 50,000 synthetic chats, a tokenizer trained here
    python -m benchmarks.tokenize --model models/demo --num-proc 4 --conversations 100000
    python -m benchmarks.tokenize --corpus qwen3             # a real tokenizer and template of tests/corpus
    python -m benchmarks.tokenize --corpus deepseek-r1-distill-qwen   # history rewriting: one sample per turn

Prints a markdown table: tokens/s of the raw fast tokenizer (its `encode_batch` on the rendered chats, 10,000
at a time, on its own thread pool over every core) and of the whole stage with its defaults (`run_tokenize`:
read records, render, mask, tokenize, pack, write; `data.num_proc` all cores), their ratio, the padding
share unpacked vs packed, and the time of a rerun served from the cache; writes the figures as JSON to
benchmarks/results/ (unless --out says otherwise). Each run is a fresh process (a run after another one in
the same process inherits its heap and measured 40-60% slower here); the timed part starts after the
imports. On a shared machine the CPU-time ratio is the steadier figure.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named tokenize.py: run as a script, its folder must not shadow the standard library's tokenize.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

WORDS = (
    "the order return refund shipping size boots jacket tent delivery days account label warranty receipt store "
    "please thanks help can you will we your our is are was has have been a an to of in on for with and or but not "
    "Northwind trail outdoor waterproof customer support tracking number week exchange color price discount"
).split()
CHINESE = ["你好", "订单", "退货", "请问", "什么时候", "能到", "谢谢", "客服", "北京", "运费", "尺码", "保修"]


def _sentence(rng: random.Random, words: int) -> str:
    if rng.random() < 0.15:
        return "".join(rng.choice(CHINESE) for _ in range(max(1, words // 2))) + "。"
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[:1].upper() + text[1:] + rng.choice([".", "?", "!", ".\n\n"])


def make_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Length-varied chats: 1-4 turns, answers from a few words to a few hundred (log-uniform)."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        messages = [{"role": "system", "content": _sentence(rng, rng.randint(4, 20))}] if rng.random() < 0.3 else []
        for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4])):
            messages.append({"role": "user", "content": _sentence(rng, rng.randint(3, 40))})
            answer = " ".join(_sentence(rng, 12) for _ in range(max(1, int(2 ** rng.uniform(0, 4.5)))))
            messages.append({"role": "assistant", "content": answer})
        chats.append(messages)
    return chats


def build_tokenizer(out_dir: Path, texts: list[str], vocab_size: int = 8000) -> Path:
    """A byte-level BPE with Qwen2's pre-tokenizer and the ChatML template, saved as a Qwen2 tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from tunepath.tokenize.templates import CHATML

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    )
    model = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"], merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]],
        unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHATML,
    )
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and its finished children: steadier than wall time on a busy machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _measure(args) -> dict:
    """One measurement in this (fresh) process, so that neither run inherits the other's heap: raw or stage."""
    from datasets import disable_progress_bars
    from transformers import AutoTokenizer

    from tunepath.sections import DataConfig, ModelConfig
    from tunepath.tokenize import TokenizeConfig, run_tokenize

    disable_progress_bars()
    work = Path(args.workdir)
    if args.child == "raw":
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        with open(work / "validate" / "records" / "records-00000.jsonl", encoding="utf-8") as f:
            texts = [tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False) for line in f]
        fast = tokenizer.backend_tokenizer
        started, cpu = time.perf_counter(), _cpu_seconds()
        tokens = sum(len(e.ids) for i in range(0, len(texts), RAW_BATCH) for e in fast.encode_batch(texts[i:i + RAW_BATCH], add_special_tokens=False))
        return {"seconds": time.perf_counter() - started, "cpu": _cpu_seconds() - cpu, "tokens": tokens}
    import tunepath.tokenize.stage  # noqa: F401  imported before the clock, as transformers is for the raw run

    cfg = TokenizeConfig(max_length=args.max_length, batch_size=args.batch_size, cache_dir=args.cache)
    started, cpu = time.perf_counter(), _cpu_seconds()
    summary = run_tokenize(cfg, ModelConfig(base=args.model), work / "validate", work / "out", data=DataConfig(num_proc=args.num_proc))
    return {"seconds": time.perf_counter() - started, "cpu": _cpu_seconds() - cpu, "cached": summary["cached"]}


RAW_BATCH = 10_000  # texts per encode_batch call of the raw baseline


def _run_child(args, child: str, cache: str = "") -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", child, "--model", args.model, "--workdir", str(args.workdir),
               "--cache", cache, "--max-length", str(args.max_length), "--batch-size", str(args.batch_size)]
    command += ["--num-proc", str(args.num_proc)] if args.num_proc else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))}
    env.pop("TOKENIZERS_PARALLELISM", None)  # as a user's shell has it: the raw tokenizer on its thread pool
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=50_000)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--num-proc", type=int, help="data.num_proc for the stage (default: its default, every core)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2, help="raw and stage runs, alternating; the fastest of each counts")
    parser.add_argument("--model", help="a model folder whose tokenizer to use (default: one trained here)")
    parser.add_argument("--corpus", help="a tests/corpus/templates entry to use as the model (real tokenizer and template)")
    parser.add_argument("--workdir", help="folder for records, cache and outputs (default: a temporary one)")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/tokenize_cpu<cores>_<date>.json)")
    parser.add_argument("--child", choices=["raw", "stage"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.child:
        print(json.dumps(_measure(args)))
        return 0

    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tunepath-bench-tokenize-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    chats = make_conversations(args.conversations)
    if args.corpus:
        from tests.corpus.templates.load import materialize

        args.model = str(materialize(args.corpus, args.workdir / "corpus" / args.corpus))
    label = args.corpus or (Path(args.model).name if args.model else "a ChatML BPE trained here")
    if not args.model:
        args.model = str(build_tokenizer(args.workdir / "tokenizer", [m["content"] for c in chats[:5000] for m in c]))
    (args.workdir / "validate" / "records").mkdir(parents=True, exist_ok=True)
    with open(args.workdir / "validate" / "records" / "records-00000.jsonl", "w", encoding="utf-8") as f:
        for i, messages in enumerate(chats):
            record = {"id": f"{i:016x}", "kind": "conversation", "split": "train" if i % 50 else "eval",
                      "source": {"file": "bench.jsonl", "line": i + 1}, "messages": messages}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    raws, stages = [], []
    for i in range(args.repeats):
        raws.append(_run_child(args, "raw"))
        stages.append(_run_child(args, "stage", str(args.workdir / f"cache-{i}")))
    cached = _run_child(args, "stage", str(args.workdir / f"cache-{args.repeats - 1}"))
    assert cached["cached"] and not any(s["cached"] for s in stages)
    raw, stage = min(raws, key=lambda r: r["seconds"]), min(stages, key=lambda r: r["seconds"])
    raw_cpu, stage_cpu = min(r["cpu"] for r in raws), min(s["cpu"] for s in stages)
    tokens = raw["tokens"]
    train = json.loads((args.workdir / "out" / "stats.json").read_text())["sft"]["train"]
    records = train.get("records_in", train["samples_in"])

    ratio = raw["seconds"] / stage["seconds"]
    rows = [
        ("tokenizer and template", label),
        ("conversations (train/eval)", f"{len(chats):,} ({records:,}/{len(chats) - records:,})"),
        ("samples (train): one per turn where the template rewrites history", f"{train['samples_out']:,} ({train.get('turn_samples', 0):,} extra)"),
        ("tokens (rendered chats)", f"{tokens:,} (longest {train['longest']}, max_length {args.max_length}, truncated {train['truncated']})"),
        ("raw fast tokenizer, encode_batch on every core", f"{tokens / raw['seconds']:,.0f} tokens/s ({raw['seconds']:.2f} s)"),
        (f"whole stage, cold (data.num_proc={args.num_proc or 'default: all cores'})", f"{tokens / stage['seconds']:,.0f} tokens/s ({stage['seconds']:.2f} s)"),
        ("stage / raw, wall time", f"{ratio:.2f} (target >= 0.7)"),
        ("stage / raw, CPU time", f"{raw_cpu / stage_cpu:.2f} (raw {raw_cpu:.1f} CPU-s, stage {stage_cpu:.1f} CPU-s)"),
        ("padding share, unpacked (train)", f"{train['padding_share_unpacked']:.1%}"),
        ("padding share, packed (train)", f"{train['padding_share_packed']:.2%} (target < 2%), {train['rows']:,} rows"),
        ("cached rerun", f"{cached['seconds']:.2f} s"),
        ("runs (fastest counts), cpu cores, load average", f"{args.repeats}, {os.cpu_count()}, {os.getloadavg()[0]:.1f}"),
    ]
    figures = {
        "date": time.strftime("%Y-%m-%d"), "cpu_cores": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2),
        "conversations": len(chats), "tokens": tokens, "tokenizer": label,
        "samples_out": train["samples_out"], "turn_samples": train.get("turn_samples", 0), "max_length": args.max_length, "num_proc": args.num_proc,
        "raw_runs": raws, "stage_runs": stages, "cached_run": cached,
        "ratio_wall": round(ratio, 3), "ratio_cpu": round(raw_cpu / stage_cpu, 3),
        "padding_share_unpacked": train["padding_share_unpacked"], "padding_share_packed": train["padding_share_packed"],
        "packed_rows": train["rows"],
    }
    tag = f"_{args.corpus}" if args.corpus else ""
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"tokenize{tag}_cpu{os.cpu_count()}_{figures['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

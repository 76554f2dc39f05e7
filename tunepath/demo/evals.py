"""The offline benchmark tasks shipped for the demo (lm-evaluation-harness task folders under `evals/`).

- `evals/northwind_policy`: the domain task. Multiple choice: a customer question, the store's answer to it
  and the answers of three other topics with the same order details; drawn from the demo generator's templates
  with its own seed, so none is a chat of the demo data.
- `evals/general_text`: forgetting. Rolling log-likelihood (word perplexity) of short general-English paragraphs
  that have nothing to do with the store; a tuned model should not get much worse on them than its base.

Regenerate the domain task's JSONL (same seed, same bytes):

    python -m tunepath.demo.evals evals
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

DOMAIN_ROWS = 60


def domain_rows(n: int = DOMAIN_ROWS, seed: int = 0) -> list[dict]:
    from tunepath.demo.data import TOPICS, _fill, _slots

    rng = random.Random(f"{seed}/benchmark")
    rows = []
    for _ in range(n):
        zh = rng.random() < 0.15
        lang = "zh" if zh else "en"
        topic, *others = rng.sample(sorted(TOPICS), 4)
        slots = _slots(rng, [topic])
        question = _fill(rng.choice(TOPICS[topic][f"ask_{lang}"]), slots, zh)
        choices = [_fill(rng.choice(TOPICS[t][f"answer_{lang}"]), slots, zh) for t in [topic, *others]]
        order = list(range(4))
        rng.shuffle(order)
        rows.append({"question": question, "choices": [choices[i] for i in order], "answer": order.index(0)})
    return rows


def write_domain_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "northwind_policy.jsonl"
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in domain_rows():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "evals")
    print(write_domain_task(root / "northwind_policy"))

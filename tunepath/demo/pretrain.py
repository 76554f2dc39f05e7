"""A short, deterministic pretraining of the demo model on the demo text, so it is a *base* model.

A random-init model barely moves under LoRA alone; after a few hundred steps of plain-text language modelling
(no chat template) it knows the domain's words, and SFT has to teach it the chat format and answer style,
as with a real base model.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)


def pretrain_demo(model, tokenizer, corpus_files: list[Path], *, steps: int, lr: float, seed: int,
                  block: int = 128, batch: int = 16, extra_texts: list[str] = ()) -> dict:
    """Full-parameter causal-LM training on random blocks of the joined demo text and `extra_texts`; returns
    first/final loss."""
    import torch

    from tunepath.demo.model import ENDOFTEXT, corpus_texts

    eot = tokenizer.token_to_id(ENDOFTEXT)
    ids: list[int] = []
    texts = [text for path in corpus_files for text in corpus_texts(path)] + list(extra_texts)
    for text in texts:
        ids.extend(tokenizer.encode(text).ids)
        ids.append(eot)
    rows = len(ids) // block
    if rows < batch:
        raise ValueError(f"demo pretraining needs at least {batch * block} tokens of text, got {len(ids)}")
    data = torch.tensor(ids[: rows * block]).view(rows, block)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    # the demo's matrices are tiny: on a shared CPU a second thread costs more in synchronisation than it computes
    # (measured 5-9x slower steps with 2 threads when other processes compete for the 2 cores); one thread also
    # gives the same weights on any machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = _steps(model, data, rows, batch, steps, generator, optimizer, schedule)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    log.info("demo pretraining: %d steps, loss %.3f -> %.3f", steps, losses[0], losses[-1])
    return {"steps": steps, "tokens": len(ids), "first_loss": losses[0], "final_loss": losses[-1]}


def _steps(model, data, rows: int, batch: int, steps: int, generator, optimizer, schedule) -> list[float]:
    import torch

    from tunepath.progress import Progress

    losses = []
    with Progress(steps, "demo pretraining", unit="step", lines=10, logger=log) as progress:
        for _ in range(steps):
            x = data[torch.randint(0, rows, (batch,), generator=generator)]
            loss = model(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.update(1, tokens=x.numel(), loss=losses[-1])
    return losses

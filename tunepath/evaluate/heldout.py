"""The held-out data a model is judged on: the tokenize stage's eval splits and the eval records they came from.

Layout (the tokenize stage's, and the `heldout/` folder the register stage logs with each model version so
promotion can re-evaluate any two versions on the same data):

    <root>/sft/eval   <root>/cpt/eval   <root>/dpo/eval   <root>/kto/eval     datasets on disk, any may be missing
    <records>                                                the eval records: the validate stage's folder (its
                                                             records/ shards) or a records.jsonl of them

Feedback held out for KTO (kto/eval: prompt, completion, desirable or not) is scored as it is (feedback AUC); when
it is all there is, its desirable answers also stand in for the SFT split: good answers to real prompts are what
perplexity and the generated-answer metrics need.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tunepath import lineage

SCORED_KINDS = ("sft", "cpt")
KINDS = ("sft", "cpt", "dpo", "kto")


@dataclass
class Heldout:
    """Loaded eval rows: `kind` is the split whose loss is the gate metric; `splits` holds every scored split."""

    root: Path
    records_path: Path
    kind: str
    splits: dict[str, list[dict]] = field(default_factory=dict)
    pairs: list[dict] = field(default_factory=list)
    feedback: list[dict] = field(default_factory=list)
    records_kind: str = "conversation"
    _eval_records: list[dict] | None = field(default=None, repr=False)

    @classmethod
    def load(cls, root: Path, records_path: Path, trained: list[str] | None = None) -> "Heldout":
        """Read every eval split under `root`; the gate split is the last trained stage's (else sft, else cpt)."""
        from datasets import load_from_disk

        root = Path(root)
        splits = {k: list(load_from_disk(str(root / k / "eval"))) for k in SCORED_KINDS if (root / k / "eval").exists()}
        feedback = list(load_from_disk(str(root / "kto" / "eval"))) if (root / "kto" / "eval").exists() else []
        records_kind = "conversation"
        if not splits and any(f["label"] for f in feedback):
            splits["sft"] = [desirable_row(f) for f in feedback if f["label"]]
            records_kind = "feedback"
        if not splits:
            raise FileNotFoundError(
                f"{root}: no held-out split (sft/eval, cpt/eval, or kto/eval with a desirable answer). The validate stage "
                "puts a share of the records in the eval split (validate.eval_share); with too few records it may be empty."
            )
        order = [k for k in reversed(trained or []) if k in splits] + [k for k in SCORED_KINDS if k in splits]
        pairs = list(load_from_disk(str(root / "dpo" / "eval"))) if (root / "dpo" / "eval").exists() else []
        return cls(root, Path(records_path), order[0], splits, pairs, feedback, records_kind)

    @property
    def rows(self) -> list[dict]:
        return self.splits[self.kind]

    def records(self, kind: str | None = None) -> list[dict]:
        """The eval records (of one kind), in order; read once, keeping only the eval split (never the train rows)."""
        if self._eval_records is None:
            self._eval_records = list(_eval_records(self.records_path)) if self.records_path.exists() else []
        recs = [r for r in self._eval_records if kind is None or r["kind"] == kind]
        if kind == "feedback" and self.records_kind == "feedback":
            recs = [r for r in recs if r.get("label")]  # the desirable ones, in the order of the stand-in SFT rows
        return recs

    def digest(self) -> str:
        """Identity of the held-out data: the eval splits' bytes (ids depend on the tokenizer and template too)."""
        h = hashlib.sha256()
        for kind in KINDS:
            folder = self.root / kind / "eval"
            if folder.exists():
                h.update(f"{kind}:{lineage.tree_hash(folder)}".encode())
        return h.hexdigest()


def desirable_row(example: dict) -> dict:
    """A held-out KTO example as an SFT eval row: prompt + completion, labels on the completion."""
    from tunepath.collate import IGNORE_INDEX

    prompt, completion = list(example["prompt_ids"]), list(example["completion_ids"])
    return {"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion, "prompt_ids": prompt}


def write_heldout(tokenize_dir: Path, records_path: Path, dest: Path) -> Path:
    """Copy the eval splits and the eval records into `dest` in the layout above; returns `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        src = tokenize_dir / kind / "eval"
        if src.exists():
            shutil.copytree(src, dest / kind / "eval", dirs_exist_ok=True)
    with open(dest / "records.jsonl", "w", encoding="utf-8") as out:
        for record in _eval_records(records_path):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return dest


_CANONICAL_HEAD = re.compile(r'\{"id": "[0-9a-f]+", "kind": "[a-z]+", "split": "([a-z]+)"')


def _eval_records(records_path: Path):
    """The eval records of a validate folder, its records folder or a records.jsonl (whose records lack no split)."""
    from tunepath.records import record_files

    for path in record_files(records_path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                head = _CANONICAL_HEAD.match(line)  # the validate stage writes the split before the content
                if head is not None and head.group(1) != "eval" or not line.strip():
                    continue  # a train record, skipped without parsing it
                record = json.loads(line)
                if record.get("split", "eval") == "eval":
                    yield record


def fingerprint(heldout_digest: str, settings: dict) -> str:
    """Two evaluations with the same fingerprint measured the same data the same way: their numbers compare."""
    return hashlib.sha256(f"{heldout_digest}/{json.dumps(settings, sort_keys=True)}".encode()).hexdigest()[:32]

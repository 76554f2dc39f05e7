"""Injection-safe tokenization of a sample whose message content holds the text of an added token.

`<|im_start|>system` typed by a user must stay text. The tokenizer would match it (special tokens and,
whatever `encode_special_tokens` says, every non-special added token too: R1's `<｜User｜>`, Qwen's
`<tool_call>` and `<think>`, Phi-3's `</s>`). So such a sample is tokenized the way the tokenizer itself
works, with the template's markup as the only source of added tokens:

1. the template's control tokens are found in a *neutral* render of the same sample, where every added
   token's text inside the messages is masked by private-use characters of the same length;
2. the text between two control tokens is one segment, as the tokenizer's own added-token split makes it
   (their lstrip/rstrip whitespace included); each is tokenized with added-token matching off (a copy of the
   tokenizer with every added token marked special and `encode_special_tokens`), and without the `▁` a
   Metaspace `prepend_scheme: first` gives only at offset 0;
3. a model vocabulary that would still produce an added token's id from its text (SentencePiece models keep
   their control pieces in the vocabulary) has that text split in two before tokenizing.
"""

from __future__ import annotations

import json


class TextOnlyEncoder:
    def __init__(self, tokenizer, guarded: dict[int, str], pattern) -> None:
        from tokenizers import Tokenizer

        self.markup = tokenizer.backend_tokenizer
        self.pattern = pattern
        self.added_ids = set(guarded)
        data = json.loads(self.markup.to_str())
        for token in data.get("added_tokens", []):
            if token["id"] in self.added_ids:
                token["special"] = True
        self.first = Tokenizer.from_str(json.dumps(data))
        self.first.encode_special_tokens = True
        if drop_first_prepend(data.get("pre_tokenizer")):
            self.rest = Tokenizer.from_str(json.dumps(data))
            self.rest.encode_special_tokens = True
        else:
            self.rest = self.first

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Plain documents (continued pretraining), every character as text: no added token can come of them."""
        encoded = [e.ids for e in self.first.encode_batch_fast(texts, add_special_tokens=False)]
        for k, ids in enumerate(encoded):
            if any(i in self.added_ids for i in ids):
                pieces: list[int] = []
                self._text(texts[k], 0, len(texts[k]), pieces, [])
                encoded[k] = pieces
        return encoded

    def encode(self, text: str, neutral: str, cuts: list[int] = ()) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and (start, end) character offsets of the tokens of `text`, whose control tokens sit where
        `neutral` has them; text runs are also cut at `cuts` (prompt ends)."""
        if len(neutral) != len(text):
            raise ValueError("the neutral render differs in length from the sample")
        marks = self.markup.encode(neutral, add_special_tokens=False)
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        cursor = 0
        for token, (s, e) in [*zip(marks.ids, marks.offsets), (None, (len(text), len(text)))]:
            if token is not None and token not in self.added_ids:
                continue
            for a, b in _pieces(cursor, s, cuts):
                self._text(text, a, b, ids, offsets)
            if token is not None:
                if text[s:e].strip() != neutral[s:e].strip():
                    raise ValueError("a control token of the markup overlaps masked content")
                ids.append(token)
                offsets.append((s, e))
            cursor = e
        return ids, offsets

    def _text(self, text: str, a: int, b: int, ids, offsets) -> None:
        """Tokenize text[a:b] as text, appending ids and absolute offsets."""
        if a >= b:
            return
        pieces = self._split(text, a, b)
        for k, (p, q) in enumerate(pieces):
            encoder = self.first if p == 0 else self.rest
            encoding = encoder.encode(text[p:q], add_special_tokens=False)
            found = [i for i in encoding.ids if i in self.added_ids]
            if found:
                raise ValueError(f"the tokenizer's vocabulary turns text into added token id {found[0]} even split apart")
            ids += encoding.ids
            offsets += [(p + s, p + e) for s, e in encoding.offsets]

    def _split(self, text: str, a: int, b: int) -> list[tuple[int, int]]:
        """[a, b) as one piece, or cut in the middle of each added token's text when the vocabulary would
        otherwise rebuild that token from it."""
        encoding = self.first.encode(text[a:b], add_special_tokens=False) if a == 0 else self.rest.encode(text[a:b], add_special_tokens=False)
        if not any(i in self.added_ids for i in encoding.ids):
            return [(a, b)]
        cuts = [a]
        for match in self.pattern.finditer(text, a, b):
            cuts.append(match.start() + max(1, len(match.group()) // 2))
        cuts.append(b)
        return [(p, q) for p, q in zip(cuts, cuts[1:]) if p < q]


def _pieces(a: int, b: int, cuts) -> list[tuple[int, int]]:
    edges = [a, *sorted(c for c in set(cuts) if a < c < b), b]
    return list(zip(edges, edges[1:]))


def drop_first_prepend(pre_tokenizer: dict | None) -> bool:
    """Set Metaspace `prepend_scheme: first` to never (in place); True when there was one."""
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any([drop_first_prepend(p) for p in pre_tokenizer.get("pretokenizers", [])])
    if pre_tokenizer.get("type") == "Metaspace" and pre_tokenizer.get("prepend_scheme") == "first":
        pre_tokenizer["prepend_scheme"] = "never"
        return True
    return False

"""Conversations to token ids and labels: -100 everywhere except the assistant's output and its end-of-turn token.

Each sample's text (see `turns`) is tokenized as a whole by the tokenizer itself, exactly as
`apply_chat_template` tokenizes it, and the learnt spans are found from the token offsets. So the ids are the
ids the model sees at inference, whatever the tokenizer (byte-level BPE, SentencePiece with `▁` and added
tokens that strip the whitespace around them). Three checks hold every sample to that:

- a learnt span starts on a token boundary, and the tokens before it equal the generation prompt's own
  tokenization (the model is given exactly those ids at inference), else the sample is left out and counted;
- no id of an added token (special or not) comes from message content: a conversation whose text holds an
  added token's string is encoded by `safe.TextOnlyEncoder`, where only the template's markup yields them;
- `parity_checks` samples per batch are compared with `tokenizer.apply_chat_template` itself; a difference
  stops the stage (`ParityError`) with the first differing token.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from itertools import accumulate, chain

from tunepath.tokenize.render import ChatRenderer, added_token_pattern, guarded_tokens, parse_tools
from tunepath.tokenize.templates import TemplateError
from tunepath.tokenize.turns import HISTORY_MISMATCH, REASONING_LOST, TOOLS_UNSUPPORTED, UNRENDERABLE, SampleError, TurnBuilder, find_end_of_turn, split_reasoning

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PROMPT_BOUNDARY = "prompt_boundary"  # a token spans the end of the generation prompt
CONTROL_TEXT = "control_text_unresolved"  # content holds control-token text the safe encoder could not isolate
# Status codes of an encoded row (0 and 1 are kept; the rest say why a conversation has no sample).
KEPT, TRUNCATED, DROPPED_TOO_LONG, DROPPED_NO_LABELS = 0, 1, 2, 3
REASON_CODES = {UNRENDERABLE: 4, HISTORY_MISMATCH: 5, REASONING_LOST: 6, TOOLS_UNSUPPORTED: 7, PROMPT_BOUNDARY: 8, CONTROL_TEXT: 9}


class ParityError(TemplateError):
    """A sample's ids differ from what the tokenizer's own apply_chat_template gives."""

    def __init__(self, row: int, message: str) -> None:
        super().__init__(message)
        self.row = row


@dataclass
class EncodedChat:
    """One sample, untruncated; `prompt_len` tokens precede the last learnt turn's span."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    answer_len: int  # tokens of the last learnt span (its content and end-of-turn token)
    prompt_text: str = ""
    answer_text: str = ""


@dataclass
class EncodedBatch:
    """Samples of one batch of conversations, concatenated (numpy arrays): sample i is ids[offsets[i]:offsets[i+1]].

    A conversation with no sample has one empty row whose status says why (`detail` has the message).
    """

    ids: object  # int32
    learnt: object  # bool: the label is the token itself, else -100
    offsets: object  # int64, one more than rows
    prompt_lens: object  # int64
    answer_lens: object  # int64
    owner: object  # int64: the conversation of each row
    status: object  # int32: KEPT or a REASON_CODES value
    restored: object  # bool: a turn was rebuilt to hold its reasoning
    split: object  # bool: tokenized in two at a prompt end that a token would have spanned
    control_text: object  # bool: content held control-token text, encoded as text
    details: list[str]
    texts: list[str]  # the rendered text of each sample ("" for a record with none)
    prompt_texts: list[str] | None = None
    answer_texts: list[str] | None = None

    def chat(self, row: int) -> EncodedChat | None:
        if self.status[row] != KEPT:
            return None
        a, b = int(self.offsets[row]), int(self.offsets[row + 1])
        ids = self.ids[a:b].tolist()
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, self.learnt[a:b].tolist())]
        texts = (self.prompt_texts[row], self.answer_texts[row]) if self.prompt_texts is not None else ("", "")
        return EncodedChat(ids, labels, int(self.prompt_lens[row]), int(self.answer_lens[row]), *texts)


class ChatEncoder:
    """Encodes batches of canonical conversations with one tokenizer and template."""

    def __init__(self, tokenizer, template: str, last_turn_only: bool = False, keep_history_reasoning: bool = False,
                 template_kwargs: dict | None = None, date=None, parity_checks: int = 0) -> None:
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.renderer = ChatRenderer(tokenizer, template, template_kwargs, date)
        self.guarded = guarded_tokens(tokenizer)
        self.pattern = added_token_pattern(self.guarded.values())
        self.added_ids = set(tokenizer.added_tokens_decoder)
        added = {t.content for t in tokenizer.added_tokens_decoder.values()}
        end_of_turn = find_end_of_turn(self.renderer, self.pattern)
        self.builder = TurnBuilder(self.renderer, end_of_turn, added, last_turn_only, keep_history_reasoning)
        self.eos_id = tokenizer.eos_token_id
        self.parity_checks = parity_checks
        self._safe = None
        self._tail = None
        self._segments: dict[str, list[int]] = {}

    def encode(self, conversations: list[list[dict]], tools: list | None = None, with_text: bool = False) -> list[EncodedChat | None]:
        """Per conversation, its last sample (the one teaching its last assistant turn); None when it has none."""
        batch = self.encode_batch(conversations, tools, with_text)
        last = {int(owner): row for row, owner in enumerate(batch.owner)}
        return [batch.chat(last[i]) for i in range(len(conversations))]

    def encode_batch(self, conversations: list[list[dict]], tools: list | None = None, with_text: bool = False) -> EncodedBatch:
        """Every sample of every conversation; `tools` is one canonical `tools` value per conversation (or None)."""
        import numpy as np

        rows: list[dict] = []
        # Reasoning written as a <think> block in the content is split off first: its tags are not content.
        conversations = [[split_reasoning(m) for m in messages] for messages in conversations]
        suspects = self._control_text_rows(conversations, tools)
        for index, messages in enumerate(conversations):
            declared = parse_tools(tools[index]) if tools is not None else None
            injected = index in suspects and self._holds_control_text(messages, tools[index] if tools is not None else None)
            try:
                samples = self.builder.samples(messages, declared, exact=injected)
            except SampleError as e:
                rows.append({"owner": index, "status": REASON_CODES[e.reason], "detail": e.detail})
                continue
            if not samples:
                rows.append({"owner": index, "status": DROPPED_NO_LABELS, "detail": "no assistant turn to learn"})
            neutral = self._neutral(messages, declared, samples) if injected else [None] * len(samples)
            rows += [
                {"owner": index, "status": KEPT, "sample": s, "injected": injected, "neutral": n, "tools": declared}
                for s, n in zip(samples, neutral)
            ]

        normal = [r for r in rows if r["status"] == KEPT and not r["injected"]]
        encodings = self.backend.encode_batch([r["sample"].text for r in normal], add_special_tokens=False) if normal else []
        for row, encoding in zip(normal, encodings):
            row["ids"], row["tokens"] = encoding.ids, Tokens(encoding)
        for row in rows:
            if row["status"] == KEPT and row["injected"]:
                self._encode_safely(row)
        for row in rows:
            if row["status"] == KEPT:
                self._label(row)
        if any(r.get("per_turn") for r in rows):
            rows = self._one_sample_per_turn(rows, conversations)
            normal = [r for r in rows if r["status"] == KEPT and not r["injected"]]
        self._check_parity([r for r in normal if r["status"] == KEPT][: self.parity_checks])

        lengths = [len(r["ids"]) if r["status"] == KEPT else 0 for r in rows]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.fromiter(chain.from_iterable(r["ids"] for r in rows if r["status"] == KEPT), dtype=np.int32, count=int(offsets[-1]))
        learnt = np.zeros(len(flat), dtype=bool)
        for row, start in zip(rows, offsets):
            if row["status"] == KEPT:
                for a, b in row["learnt"]:
                    learnt[start + a : start + b] = True
        batch = EncodedBatch(
            ids=flat,
            learnt=learnt,
            offsets=offsets,
            prompt_lens=np.array([r.get("prompt_len", 0) if r["status"] == KEPT else 0 for r in rows], dtype=np.int64),
            answer_lens=np.array([r.get("answer_len", 0) if r["status"] == KEPT else 0 for r in rows], dtype=np.int64),
            owner=np.array([r["owner"] for r in rows], dtype=np.int64),
            status=np.array([r["status"] for r in rows], dtype=np.int32),
            restored=np.array([r["status"] == KEPT and r["sample"].restored for r in rows], dtype=bool),
            split=np.array([r["status"] == KEPT and r.get("split", False) for r in rows], dtype=bool),
            control_text=np.array([r["status"] == KEPT and r["injected"] for r in rows], dtype=bool),
            details=[r.get("detail", "") for r in rows],
            texts=[r["sample"].text if r["status"] == KEPT else "" for r in rows],
        )
        if with_text:
            batch.prompt_texts = [_prompt_text(r) for r in rows]
            batch.answer_texts = [_answer_text(r) for r in rows]
        return batch

    # -- pieces ---------------------------------------------------------------------------------------------

    def _control_text_rows(self, conversations: list[list[dict]], tools) -> set[int]:
        """The conversations that may hold an added token's text: one regex pass over the batch, and the rows
        around each hit (most batches have none)."""
        if self.pattern is None:
            return set()
        texts = [_message_texts(messages, tools[i] if tools is not None else None) for i, messages in enumerate(conversations)]
        joined = "\1".join(texts)  # no added token holds \1 or NUL, so no match spans two texts
        hits = [m.start() for m in self.pattern.finditer(joined)]
        if not hits:
            return set()
        ends = list(accumulate(len(t) + 1 for t in texts))
        return {bisect.bisect_right(ends, at) for at in hits}

    def _holds_control_text(self, messages: list[dict], tools) -> bool:
        return self.pattern is not None and self.pattern.search(_message_texts(messages, tools)) is not None

    def _neutral(self, messages: list[dict], tools, samples: list) -> list[str | None]:
        """The samples rendered with every added token's text in the messages masked by private-use characters of
        the same length: what remains of added tokens there is the template's markup. None where the template
        does not insert the masked text as it is (the sample is then counted, not guessed at)."""
        mask = _masker(self.pattern)
        masked = [{k: mask(v) if k != "role" else v for k, v in m.items() if k != "tool_calls"} | _masked_calls(m, mask) for m in messages]
        try:
            neutral = self.builder.samples(masked, _masked_tools(tools, mask))
        except SampleError:
            return [None] * len(samples)
        if len(neutral) != len(samples):
            return [None] * len(samples)
        return [n.text if len(n.text) == len(s.text) else None for n, s in zip(neutral, samples)]

    @property
    def text_encoder(self):
        """The tokenizer with added-token matching off (built on first use)."""
        from tunepath.tokenize.safe import TextOnlyEncoder

        if self._safe is None:
            self._safe = TextOnlyEncoder(self.tokenizer, self.guarded, self.pattern)
        return self._safe

    def _encode_safely(self, row: dict) -> None:
        try:
            if row["neutral"] is None:
                raise ValueError("the chat template does not insert content holding control-token text verbatim")
            row["ids"], offsets = self.text_encoder.encode(row["sample"].text, row["neutral"])
            row["tokens"] = Tokens(None, offsets)
        except ValueError as e:
            row["status"], row["detail"] = REASON_CODES[CONTROL_TEXT], str(e)

    def _label(self, row: dict) -> None:
        """Token ranges of the learnt spans, the prompt and the last answer, from the tokens' character offsets."""
        sample = row["sample"]
        straddled = [s for s, _ in sample.spans if not self._boundary_ok(row, s)]
        if straddled and not row["injected"] and straddled != [sample.spans[-1][0]]:
            row["per_turn"] = True  # an earlier turn's prompt ends inside a token: see _one_sample_per_turn
            return
        if straddled:
            # The prompt is tokenized as the model is given it, and the answer from there on (as trainers that
            # tokenize prompt and completion apart do): "<think>\n" + "\n</think>" would merge "\n\n" otherwise.
            if row["injected"]:
                row["ids"], offsets = self.text_encoder.encode(sample.text, row["neutral"], straddled)
            else:
                row["ids"], offsets = self._encode_split(sample.text, straddled)
            row["tokens"] = Tokens(None, offsets)
            row["split"] = True
        tokens = row["tokens"]
        row["learnt"] = [(tokens.first_at(s), tokens.first_at(e)) for s, e in sample.spans]
        row["prompt_len"] = tokens.first_at(sample.prompt_end)
        first, last = row["learnt"][-1]
        row["answer_len"] = last - first

    def _one_sample_per_turn(self, rows: list[dict], conversations: list[list[dict]]) -> list[dict]:
        """Conversations in which an earlier answer starts inside a token (Qwen2.5: the "\n" after
        `<|im_start|>assistant` and an answer's leading "\n" are one token) get one sample per assistant turn.
        One sample cannot teach such a turn: at inference its prompt ends before that token, while every later
        turn's history is tokenized whole, with it. Each per-turn sample has its whole history and its own
        prompt, and its answer is tokenized from the prompt's end on, as a last turn with a straddle is."""
        tools = {r["owner"]: r["tools"] for r in rows if r.get("per_turn")}
        built: dict[int, list[dict] | None] = {}
        for owner, declared in tools.items():
            messages = conversations[owner]
            try:
                samples = [self.builder.samples(messages[: i + 1], declared)[-1] for i, m in enumerate(messages) if m["role"] == "assistant"]
            except SampleError as e:  # the whole conversation rendered, so a prefix hardly fails: counted if it does
                built[owner] = [{"owner": owner, "status": REASON_CODES[e.reason], "detail": e.detail}]
                continue
            for sample in samples:
                sample.spans = sample.spans[-1:]  # its own turn only: the earlier ones have their own samples
            built[owner] = [{"owner": owner, "status": KEPT, "sample": s, "injected": False, "neutral": None, "tools": declared} for s in samples]
        fresh = [r for group in built.values() for r in group if r["status"] == KEPT]
        for row, encoding in zip(fresh, self.backend.encode_batch([r["sample"].text for r in fresh], add_special_tokens=False)):
            row["ids"], row["tokens"] = encoding.ids, Tokens(encoding)
            self._label(row)
        out = []
        for row in rows:  # the conversation's new samples take the place of its first old one
            if row["owner"] not in built:
                out.append(row)
            elif built[row["owner"]] is not None:
                out += built[row["owner"]]
                built[row["owner"]] = None
        return out

    def _encode_split(self, text: str, cuts: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """`text` tokenized in pieces cut at `cuts`; pieces after the first take no Metaspace `▁` of their own."""
        ids, offsets = [], []
        edges = [0, *sorted(set(cuts)), len(text)]
        for k, (a, b) in enumerate(zip(edges, edges[1:])):
            encoding = (self.backend if k == 0 else self.tail_backend).encode(text[a:b], add_special_tokens=False)
            ids += encoding.ids
            offsets += [(a + s, a + e) for s, e in encoding.offsets]
        return ids, offsets

    @property
    def tail_backend(self):
        """The tokenizer as it treats text after a control token (no Metaspace `prepend_scheme: first` at its start)."""
        if self._tail is None:
            import json

            from tokenizers import Tokenizer

            from tunepath.tokenize.safe import drop_first_prepend

            data = json.loads(self.backend.to_str())
            self._tail = Tokenizer.from_str(json.dumps(data)) if drop_first_prepend(data.get("pre_tokenizer")) else self.backend
        return self._tail

    def _boundary_ok(self, row: dict, start: int) -> bool:
        """The tokens before `start` are the generation prompt's own: a token boundary at `start`, and the text
        since the last control token tokenizes alone to the same ids (earlier segments cannot differ: added tokens
        split the text before anything else runs)."""
        ids, tokens = row["ids"], row["tokens"]
        first = tokens.first_at(start)
        if tokens.straddles(start, first) and not self._absorbs_whitespace(row, first - 1, start):
            return False
        if row["injected"]:
            return True  # the safe encoder split the text at the template's markup: its segments stand alone
        control, added = first - 1, self.added_ids
        while control >= 0 and ids[control] not in added:
            control -= 1
        cut = tokens.end_of(control) if control >= 0 else 0
        segment = row["sample"].text[cut:start]
        if cut == 0:  # no control token before the prompt's end: the whole prompt, tokenized alone
            return ids[:first] == self.backend.encode(segment, add_special_tokens=False).ids
        if segment not in self._segments:  # generation prompts end in a few fixed strings
            self._segments[segment] = self._tail_ids(row["sample"].text[:cut], segment)
        return ids[control + 1 : first] == self._segments[segment]

    def _absorbs_whitespace(self, row: dict, k: int, start: int) -> bool:
        """Token `k` is an added token that took the whitespace after it (`rstrip`: Phi-3's `<|assistant|>`,
        Phi-4's `<|im_sep|>`) up to past `start`. That is no straddle: the answer's leading whitespace has no
        tokens of its own, in apply_chat_template's ids as here, and the prompt's ids end with the same token.
        Tokenizing the answer apart would give that whitespace tokens the model never sees."""
        return row["ids"][k] in self.added_ids and not row["sample"].text[start : row["tokens"].end_of(k)].strip()

    def _tail_ids(self, before: str, segment: str) -> list[int]:
        """Ids of `segment` right after a control token (a Metaspace `prepend_scheme: first` adds no `▁` there)."""
        probe = self.backend.encode(before[-200:] + segment, add_special_tokens=False)
        cut = len(before[-200:])
        return [i for i, (s, _) in zip(probe.ids, probe.offsets) if s >= cut]

    def _check_parity(self, rows: list[dict]) -> None:
        for row in rows:
            sample = row["sample"]
            kwargs = {"tools": row["tools"], "tokenize": True, "return_dict": False, **self.renderer.kwargs}
            prompt = list(self.tokenizer.apply_chat_template(sample.history, add_generation_prompt=True, **kwargs))
            partial = sample.restored or row.get("split", False)
            theirs = prompt if partial else list(self.tokenizer.apply_chat_template([*sample.history, sample.turn], **kwargs))
            ours = row["ids"][: row["prompt_len"]] if partial else row["ids"]
            if ours != theirs:
                at = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                show = self.tokenizer.convert_ids_to_tokens
                raise ParityError(
                    row["owner"],
                    f"token {at} differs from apply_chat_template: ours {show(ours[at:at + 3])}, "
                    f"the tokenizer's {show(theirs[at:at + 3])} ({len(ours)} vs {len(theirs)} tokens)",
                )


class Tokens:
    """Where a sample's tokens sit in its text: a tokenizers Encoding (asked only at the few positions that
    matter, no per-token Python objects) or, for pieced-together encodings, a list of (start, end) offsets."""

    def __init__(self, encoding, offsets: list[tuple[int, int]] | None = None) -> None:
        self.encoding = encoding
        self.offsets = offsets
        self._first: dict[int, int] = {}  # the same few positions are asked for by the checks and the labels

    def _spans(self) -> list[tuple[int, int]]:
        if self.offsets is None:
            self.offsets = self.encoding.offsets
        return self.offsets

    def first_at(self, position: int) -> int:
        """Index of the first token starting at or after `position`."""
        k = self._first.get(position)
        if k is None:
            k = self._first[position] = self._find_first(position)
        return k

    def _find_first(self, position: int) -> int:
        if self.encoding is not None:
            k = self.encoding.char_to_token(position)
            if k is not None:
                return k if self.encoding.token_to_chars(k)[0] >= position else k + 1
        return bisect.bisect_left(self._spans(), position, key=_start)

    def straddles(self, position: int, first: int | None = None) -> bool:
        """True when a token starts before `position` and ends after it (`first`: first_at(position), if known)."""
        k = self.first_at(position) if first is None else first
        return k > 0 and self.end_of(k - 1) > position

    def end_of(self, k: int) -> int:
        if self.encoding is not None:
            return self.encoding.token_to_chars(k)[1]
        return self._spans()[k][1]


def _message_texts(messages: list[dict], tools) -> str:
    """Every text of a conversation that content can reach, NUL-separated (no added token holds a NUL)."""
    texts = [tools or ""]
    for m in messages:
        texts += [m.get("content") or "", m.get("reasoning") or "", m.get("name") or ""]
        texts += [f"{c.get('name', '')}\0{c.get('arguments', '')}" for c in m.get("tool_calls") or ()]
    return "\0".join(texts)


def _start(offset: tuple[int, int]) -> int:
    return offset[0]


def _prompt_text(row: dict) -> str:
    if row["status"] != KEPT:
        return ""
    return row["sample"].text[: row["sample"].prompt_end]


def _answer_text(row: dict) -> str:
    if row["status"] != KEPT:
        return ""
    s, e = row["sample"].spans[-1]
    return row["sample"].text[s:e]


def _masker(pattern):
    def mask(text):
        return pattern.sub(lambda m: "\ue002" * len(m.group()), text) if isinstance(text, str) and text else text

    return mask


def _masked_calls(message: dict, mask) -> dict:
    calls = message.get("tool_calls")
    if not calls:
        return {}
    return {"tool_calls": [{k: mask(v) if isinstance(v, str) else v for k, v in c.items()} for c in calls]}


def _masked_tools(tools, mask):
    """Declared tools with added tokens' text masked (a JSON round trip keeps the structure)."""
    if not tools:
        return tools
    import json

    return json.loads(mask(json.dumps(tools, ensure_ascii=False)))


def check_encoder(encoder: ChatEncoder, source: str = "tokenizer", model: str = "") -> None:
    """Fail early on a template that cannot render and learn a plain user/assistant exchange."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    try:
        samples = encoder.builder.samples(probe)
    except SampleError as e:
        samples, detail = [], e.detail
    else:
        detail = "it renders no assistant turn to learn"
    if not samples:
        whose = f"the chat template of {model!r}" if source == "tokenizer" else f"the {source} chat template"
        raise TemplateError(
            f"{whose} cannot render a user/assistant exchange ({detail}); set tokenize.template to chatml or llama2, "
            "or to custom with tokenize.custom_template"
        )

"""Every real chat template of the corpus (tests/corpus/templates): ids, spans, turns, reasoning, injection, dates.

The tokenizers are the published files of Qwen2.5, Qwen3, DeepSeek-R1-Distill (current and older template),
Llama-3.x, Mistral, Gemma and Phi models (SOURCES.md says where each came from). For each one and each
conversation below, the encoder's samples must be exactly what `tokenizer.apply_chat_template` gives.
"""

from __future__ import annotations

import json

import pytest

from tests.corpus.templates.load import ENTRIES, materialize
from tunepath.tokenize.masks import KEPT, REASON_CODES, ChatEncoder
from tunepath.tokenize.render import guarded_tokens, pin_date

WITH_TOKENIZER = ENTRIES  # published vocabularies, and stand-ins for the rest (see load.py)

SINGLE = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]
SYSTEM = [{"role": "system", "content": "You are a concise assistant."}, *SINGLE]
MULTI = [
    {"role": "system", "content": "You help customers of a shop."},
    {"role": "user", "content": "Where is my order NW-123456?"},
    {"role": "assistant", "content": "It has been shipped.\n\nIt should arrive on Friday."},
    {"role": "user", "content": "可以退货吗？"},
    {"role": "assistant", "content": "可以，30天内免费退货。"},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]
REASONING = [
    {"role": "user", "content": "What is 17 * 3?"},
    {"role": "assistant", "reasoning": "17 * 3 = 51, since 17 * 3 = 30 + 21.", "content": "51"},
    {"role": "user", "content": "And plus 9?"},
    {"role": "assistant", "reasoning": "51 + 9 = 60.", "content": "60"},
]
# Added tokens some templates interpret in content themselves (reasoning and tool-response delimiters).
TEMPLATE_MARKUP_TEXT = {"<think>", "</think>", "<tool_response>", "</tool_response>"}
CONVERSATIONS = {"single": SINGLE, "system": SYSTEM, "multi": MULTI, "reasoning": REASONING}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """name -> (tokenizer, template with the date pinned), loaded once."""
    import datetime as dt

    from transformers import AutoTokenizer

    loaded = {}
    for name in WITH_TOKENIZER:
        folder = materialize(name, tmp_path_factory.mktemp(name))
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else tokenizer.chat_template["default"]
        loaded[name] = (tokenizer, pin_date(template, dt.date(2024, 7, 26)))
    return loaded


def _encoder(corpus, name, parity_checks: int = 1_000_000, **kwargs) -> ChatEncoder:
    tokenizer, template = corpus[name]
    return ChatEncoder(tokenizer, template, parity_checks=parity_checks, **kwargs)


def _refuses_system(tokenizer, template) -> bool:
    try:
        tokenizer.apply_chat_template(SYSTEM, chat_template=template, tokenize=False)
    except Exception:
        return True
    return False


def _apply(tokenizer, template, encoder, messages, **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=False,
                                              **encoder.renderer.kwargs, **kwargs))


@pytest.mark.parametrize("name", WITH_TOKENIZER)
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_samples_are_what_apply_chat_template_gives(corpus, name, conversation):
    tokenizer, template = corpus[name]
    messages = CONVERSATIONS[conversation]
    if messages[0]["role"] == "system" and _refuses_system(tokenizer, template):
        pytest.skip("the template refuses a system message (test_system_refused_is_counted covers it)")
    encoder = _encoder(corpus, name)  # parity_checks: every sample is also compared inside the encoder
    batch = encoder.encode_batch([messages])
    assert list(batch.status) == [KEPT] * len(batch.status), batch.details
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for row in range(len(batch.status)):
        chat = batch.chat(row)
        a, b = int(batch.offsets[row]), int(batch.offsets[row + 1])
        learnt_ids = [t for t, m in zip(chat.input_ids, batch.learnt[a:b]) if m]
        learnt = tokenizer.decode(learnt_ids, skip_special_tokens=False)
        # The prompt of a sample is the generation prompt the model gets at inference, token for token.
        last = turns[-len(batch.status) + row] if len(batch.status) == len(turns) else turns[-1]
        history = [encoder.renderer.message(m, False) for m in messages[:last]]
        assert chat.input_ids[: chat.prompt_len] == _apply(tokenizer, template, encoder, history, add_generation_prompt=True)
        answer = messages[last]
        assert answer["content"] in learnt
        if answer.get("reasoning"):
            assert answer["reasoning"] in learnt, f"the reasoning of turn {last} is not learnt"
        if not batch.restored[row]:
            turn = encoder.renderer.message(answer, True)
            assert chat.input_ids == _apply(tokenizer, template, encoder, [*history, turn])
    # Prefix-stable templates teach every turn in one sample; history rewriting gives one sample per turn.
    assert len(batch.status) in (1, len(turns))


# Whitespace at the edges of every message: added tokens with rstrip/lstrip (Phi-3's `<|assistant|>`, Phi-4's
# `<|im_sep|>`) take it into their own match, so it has no tokens of its own; other templates trim it.
EDGES = [
    {"role": "user", "content": "\n What is the capital of France?  "},
    {"role": "assistant", "content": " \nParis. \n"},
    {"role": "user", "content": " Thanks!\n"},
    {"role": "assistant", "content": "\n\nYou are welcome."},
]


@pytest.mark.parametrize("name", WITH_TOKENIZER)
def test_whitespace_around_content_keeps_the_tokenizers_ids(corpus, name):
    """An answer's leading whitespace swallowed by the prompt's last token is no reason to tokenize the answer
    apart: every sample is apply_chat_template's own ids, the answer included, not just its prompt."""
    tokenizer, template = corpus[name]
    encoder = _encoder(corpus, name)
    batch = encoder.encode_batch([EDGES])
    assert list(batch.status) == [KEPT] * len(batch.status), batch.details
    turns = [1, 3]
    for row in range(len(batch.status)):
        chat = batch.chat(row)
        last = turns[-len(batch.status) + row] if len(batch.status) == len(turns) else turns[-1]
        history = [encoder.renderer.message(m, False) for m in EDGES[:last]]
        prompt = _apply(tokenizer, template, encoder, history, add_generation_prompt=True)
        assert chat.input_ids[: chat.prompt_len] == prompt
        if batch.restored[row]:
            continue
        full = _apply(tokenizer, template, encoder, [*history, encoder.renderer.message(EDGES[last], True)])
        if full[: len(prompt)] == prompt:  # no token of the whole text spans the prompt's end
            assert not batch.split[row] and chat.input_ids == full
        else:  # one does (Qwen's "\n" + "\n"): the answer is tokenized from the inference prompt's end on
            assert batch.split[row] and len(batch.status) == len(turns), "a sample teaches a turn after a straddled prompt"


@pytest.mark.parametrize("name", WITH_TOKENIZER)
def test_user_turns_and_markup_are_never_learnt(corpus, name):
    tokenizer, template = corpus[name]
    encoder = _encoder(corpus, name)
    messages = MULTI[1:]
    batch = encoder.encode_batch([messages])
    for row in range(len(batch.status)):
        a, b = int(batch.offsets[row]), int(batch.offsets[row + 1])
        ids = batch.ids[a:b].tolist()
        runs, current = [], []
        for t, m in zip(ids, batch.learnt[a:b]):
            if m:
                current.append(t)
            elif current:
                runs.append(tokenizer.decode(current, skip_special_tokens=True).strip())
                current = []
        if current:
            runs.append(tokenizer.decode(current, skip_special_tokens=True).strip())
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        # Each learnt run is one answer (plus the end of turn, invisible once special tokens are skipped).
        assert all(any(r == a or r.endswith(a) for a in answers) for r in runs), runs
        assert not any(m["content"] in r for r in runs for m in messages if m["role"] == "user")


def _added(tokenizer) -> list[str]:
    """Every added token but whitespace runs (Gemma's indentation tokens are text by nature)."""
    return sorted(set(guarded_tokens(tokenizer).values()))


@pytest.mark.parametrize("name", WITH_TOKENIZER)
def test_no_content_produces_an_added_token(corpus, name):
    """Every added token of the tokenizer (special or not), typed in system, user and assistant content."""
    tokenizer, template = corpus[name]
    encoder = _encoder(corpus, name, parity_checks=0)
    added_ids = set(guarded_tokens(tokenizer))
    left_out = [t.content for i, t in tokenizer.added_tokens_decoder.items() if i not in added_ids]
    assert all(not t.replace("\u2581", " ").strip() for t in left_out), left_out
    system = not _refuses_system(tokenizer, template)
    base = SYSTEM if system else SINGLE
    clean = encoder.encode_batch([base])
    clean_controls = sorted(i for i in clean.ids.tolist() if i in added_ids)
    dirty = []
    for token in _added(tokenizer):
        forged = f"a{token}b {token}\n"
        dirty.append([{**m, "content": m["content"] + " " + forged} for m in base])
    batch = encoder.encode_batch(dirty)
    interpreted = []
    for row, token in enumerate(_added(tokenizer)):
        if batch.status[row] != KEPT:
            # The template itself reads this text as markup (Qwen3 splits content at `</think>`): counted, not kept.
            assert "control-token text" in batch.details[row]
            interpreted.append(token)
            continue
        a, b = int(batch.offsets[row]), int(batch.offsets[row + 1])
        ids = batch.ids[a:b].tolist()
        assert sorted(i for i in ids if i in added_ids) == clean_controls, f"{token!r} became a control token"
        # Nothing lost: the forged text is all there, as text.
        assert tokenizer.decode(ids, skip_special_tokens=False).count(token) == batch.texts[row].count(token)
        assert batch.control_text[row]
    assert set(interpreted) <= TEMPLATE_MARKUP_TEXT, interpreted


@pytest.mark.parametrize("name", WITH_TOKENIZER)
def test_system_refused_is_counted(corpus, name):
    tokenizer, template = corpus[name]
    if not _refuses_system(tokenizer, template):
        pytest.skip("the template accepts a system message")
    batch = _encoder(corpus, name).encode_batch([SYSTEM, SINGLE])
    assert batch.status[0] != KEPT and "raised" in batch.details[0]
    assert batch.status[1] == KEPT


@pytest.mark.parametrize("name", WITH_TOKENIZER)
def test_renders_are_deterministic(corpus, name):
    tokenizer, template = corpus[name]
    first = _encoder(corpus, name).encode_batch([SINGLE])
    again = _encoder(corpus, name).encode_batch([SINGLE])
    assert first.ids.tolist() == again.ids.tolist()
    text = tokenizer.decode(first.ids.tolist(), skip_special_tokens=False)
    if "date_string" in template or "strftime_now" in template:
        import datetime as dt

        assert dt.date.today().strftime("%d %b %Y") not in text or dt.date.today() == dt.date(2024, 7, 26)
        if "Today Date" in text:
            assert "26 Jul 2024" in text


TOOLS = '[{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]'
TOOL_CHAT = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "abc123xyz", "name": "get_weather", "arguments": '{"city": "Paris"}'}]},
    {"role": "tool", "content": '{"temperature": 21}', "tool_call_id": "abc123xyz", "name": "get_weather"},
    {"role": "assistant", "content": "It is 21 degrees in Paris."},
]


def _learnt_runs(tokenizer, batch, row) -> list[str]:
    a, b = int(batch.offsets[row]), int(batch.offsets[row + 1])
    runs, current = [], []
    for t, m in zip(batch.ids[a:b].tolist(), batch.learnt[a:b]):
        if m:
            current.append(t)
        elif current:
            runs.append(tokenizer.decode(current, skip_special_tokens=False))
            current = []
    return runs + ([tokenizer.decode(current, skip_special_tokens=False)] if current else [])


@pytest.mark.parametrize("name", WITH_TOKENIZER)
def test_tool_calls_are_learnt_and_results_masked(corpus, name):
    tokenizer, template = corpus[name]
    encoder = _encoder(corpus, name)
    batch = encoder.encode_batch([TOOL_CHAT], [TOOLS])
    if encoder.builder.ignores_tools() or batch.status[0] == REASON_CODES["tools_unsupported"]:
        # No tool support, or tool calls the template does not render (Granite 3.0): counted, never half-learnt.
        assert batch.status[0] != KEPT and "tool" in batch.details[0]
        return
    if batch.status[0] != KEPT:
        pytest.skip(f"the template refuses this tool conversation: {batch.details[0]}")
    runs = [r for row in range(len(batch.status)) for r in _learnt_runs(tokenizer, batch, row)]
    assert any("get_weather" in r and "Paris" in r for r in runs), runs
    assert any("21 degrees" in r for r in runs)
    assert not any("temperature" in r for r in runs), "a tool result was learnt"
    # The declared tool reaches the prompt, as at inference.
    assert any("Current weather of a city" in t for t in batch.texts)


@pytest.mark.parametrize("name", WITH_TOKENIZER)
def test_the_system_prompt_is_prompt_wherever_the_template_puts_it(corpus, name):
    """Gemma-3 folds the system text into the first user turn, Mistral into the last one, R1 before the first
    role tag: wherever it lands it is prompt, never learnt."""
    tokenizer, template = corpus[name]
    if _refuses_system(tokenizer, template):
        pytest.skip("the template refuses a system message")
    batch = _encoder(corpus, name).encode_batch([MULTI])
    assert list(batch.status) == [KEPT] * len(batch.status), batch.details
    for row in range(len(batch.status)):
        assert MULTI[0]["content"] in batch.texts[row]
        assert not any(MULTI[0]["content"] in run for run in _learnt_runs(tokenizer, batch, row))


def test_llama_3_1_tool_prompt_has_the_ipython_environment_and_a_pinned_date(corpus):
    """Llama-3.1 switches on tool calling with "Environment: ipython" in the system header and prints a date."""
    tokenizer, _ = corpus["llama-3.1-instruct"]
    batch = _encoder(corpus, "llama-3.1-instruct").encode_batch([TOOL_CHAT], [TOOLS])
    assert list(batch.status) == [KEPT] * len(batch.status), batch.details
    header = "<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    assert all(header in text for text in batch.texts)
    assert any('{"name": "get_weather", "parameters": {"city": "Paris"}}' in run for run in _learnt_runs(tokenizer, batch, 0))


def test_a_tokenizer_class_that_rewrites_the_pipeline_is_not_used(tmp_path, caplog):
    """R1-Distill-Qwen names LlamaTokenizerFast: without config.json, transformers 5 builds Llama's Metaspace
    pre-tokenizer over a byte-level vocabulary; the stage loads tokenizer.json as it is instead."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from tunepath.tokenize.loading import PROBE, load_tokenizer

    folder = materialize("deepseek-r1-distill-qwen", tmp_path / "r1")
    (folder / "config.json").unlink()
    published = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PROBE, add_special_tokens=False).ids
    assert AutoTokenizer.from_pretrained(str(folder))(PROBE, add_special_tokens=False)["input_ids"] != published
    tokenizer = load_tokenizer(str(folder))
    assert tokenizer(PROBE, add_special_tokens=False)["input_ids"] == published
    assert "ids differ from its tokenizer.json" in caplog.text


STAGE_RECORDS = [
    {"kind": "conversation", "split": split, "messages": messages}
    for split in ("train", "eval") for messages in (SINGLE, MULTI[1:], REASONING)
]


@pytest.mark.parametrize("name", WITH_TOKENIZER)
def test_serving_prompt_is_the_training_prompt(corpus, name, tmp_path):
    """The tokenizer folder the stage saves (merge packages it; evaluate and serving render with it) gives, with
    apply_chat_template(add_generation_prompt=True), exactly the prompt ids of every held-out sample."""
    from datasets import load_from_disk
    from test_tokenize_helpers import write_records
    from transformers import AutoTokenizer

    from tunepath.sections import ModelConfig
    from tunepath.tokenize import TokenizeConfig, run_tokenize

    folder = materialize(name, tmp_path / "model")
    validate = write_records(tmp_path / "v", STAGE_RECORDS)
    run_tokenize(TokenizeConfig(cache_dir=str(tmp_path / "cache"), max_length=1024), ModelConfig(base=str(folder)), validate, tmp_path / "out")
    served = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "tokenizer"))
    rows = load_from_disk(str(tmp_path / "out" / "sft" / "eval"))
    prompts = set()
    for messages in (SINGLE, MULTI[1:], REASONING):
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                history = [{"role": x["role"], "content": x["content"]} for x in messages[:i]]
                prompts.add(tuple(served.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=False)))
    held_out = {tuple(r) for r in rows["prompt_ids"]}
    assert held_out and held_out <= prompts, "a held-out prompt is not what serving renders"
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())["sft"]["eval"]
    assert stats["samples_out"] == len(rows)


def test_history_reasoning_is_kept_on_request(corpus):
    """Qwen2.5 renders a `<think>` block in content as it is: kept in history, both turns share one sample."""
    tokenizer, _ = corpus["qwen2.5-instruct"]
    dropped = _encoder(corpus, "qwen2.5-instruct").encode_batch([REASONING])
    kept = _encoder(corpus, "qwen2.5-instruct", keep_history_reasoning=True).encode_batch([REASONING])
    assert len(dropped.status) == 2 and len(kept.status) == 1
    assert REASONING[1]["reasoning"] in kept.texts[0]
    assert REASONING[1]["reasoning"] not in dropped.texts[1]  # turn 2's history, as clients send it


def test_a_parity_difference_stops_with_file_and_line(corpus, monkeypatch):
    from tunepath.tokenize.batches import EncodePlan, encoder_for, sft_batch
    from tunepath.tokenize.masks import ParityError

    tokenizer, template = corpus["qwen3"]
    plan = EncodePlan("corpus/qwen3", "test", template, 512, "truncate", False, parity_checks=4)
    encoder = encoder_for(plan, tokenizer)
    real = tokenizer.apply_chat_template

    def off_by_one(messages, **kwargs):
        ids = list(real(messages, **kwargs))
        return ids if kwargs.get("add_generation_prompt") else ids[:-1] + [ids[-1] + 1]

    monkeypatch.setattr(encoder.tokenizer, "apply_chat_template", off_by_one)
    batch = {"messages": [SINGLE, MULTI[1:]], "tools": [None, None],
             "source": [{"file": "data/raw/chat.jsonl", "line": 7}, {"file": "data/raw/chat.jsonl", "line": 8}]}
    with pytest.raises(ParityError, match=r"data/raw/chat.jsonl, line 7: token \d+ differs from apply_chat_template"):
        sft_batch(batch, [0, 1], plan, False)


@pytest.mark.parametrize("name", WITH_TOKENIZER)
def test_tool_content_never_produces_an_added_token(corpus, name):
    tokenizer, template = corpus[name]
    encoder = _encoder(corpus, name, parity_checks=0)
    if encoder.builder.ignores_tools():
        pytest.skip("the template has no tool support")
    clean = encoder.encode_batch([TOOL_CHAT], [TOOLS])
    if clean.status[0] != KEPT:
        pytest.skip(f"the template refuses this tool conversation: {clean.details[0]}")
    guarded = guarded_tokens(tokenizer)

    def controls_of(batch, owner):  # the control tokens of every sample of one conversation
        rows = [r for r in range(len(batch.status)) if batch.owner[r] == owner]
        return [sorted(i for i in batch.ids[int(batch.offsets[r]) : int(batch.offsets[r + 1])].tolist() if i in guarded) for r in rows]

    controls = controls_of(clean, 0)
    dirty = []
    for token in _added(tokenizer):
        messages = [dict(m) for m in TOOL_CHAT]
        messages[2]["content"] = '{"temperature": "' + token + '"}'
        dirty.append(messages)
    batch = encoder.encode_batch(dirty, [TOOLS] * len(dirty))
    for owner, token in enumerate(_added(tokenizer)):
        rows = [r for r in range(len(batch.status)) if batch.owner[r] == owner]
        if any(batch.status[r] != KEPT for r in rows):
            assert all("control-token text" in batch.details[r] for r in rows if batch.status[r] != KEPT)
            assert token in TEMPLATE_MARKUP_TEXT, (token, [batch.details[r] for r in rows])
            continue
        assert controls_of(batch, owner) == controls, f"{token!r} in a tool result became a control token"

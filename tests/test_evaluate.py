"""The evaluate stage: held-out scores for base and tuned, preference accuracy, samples from the tokenize stage's
prompt ids, and gates that block a worse model."""

from __future__ import annotations

import json

import pytest

from tests.test_promote_support import build_workspace, fast_config, make_train_dir
from tunepath.evaluate import EvaluateConfig
from tunepath.evaluate.gates import GateFailed, apply_gates
from tunepath.evaluate.samples import is_degenerate
from tunepath.evaluate.scoring import mean_loss, preference_summary
from tunepath.sections import ModelConfig


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, demo_assets):
    return build_workspace(tmp_path_factory.mktemp("evaluate") / "ws", demo_assets / "models" / "demo")


def evaluate(root, scale: float, **settings) -> dict:
    from tunepath.evaluate.stage import run_evaluate

    art = root / "artifacts"
    make_train_dir(root, scale)
    return run_evaluate(fast_config(**settings).evaluate, ModelConfig(), art / "validate", art / "tokenize", art / "train", art / "evaluate")


def test_repaired_model_beats_the_noised_base_and_everything_is_written(workspace):
    m = evaluate(workspace, 1.0)
    out = workspace / "artifacts" / "evaluate"
    assert m["passed"] and m["split_kind"] == "sft"
    assert m["tuned_perplexity"] < 0.5 * m["base_perplexity"]
    assert set(m["splits"]) == {"sft", "cpt"}  # every held-out split is scored; sft is the gate split
    assert m["preference"]["pairs"] == 4 and m["preference"]["reward_accuracy"] == 1.0
    assert m["tuned_preference_accuracy"] >= m["base_preference_accuracy"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"tuned", "tuned_without_template", "base", "reference", "tuned_scores", "base_scores"} <= set(samples[0])
    assert samples[0]["tuned_without_template"] and not samples[3]["tuned_without_template"]  # only the report's samples
    assert set(samples[0]["tuned_scores"]) == {"exact_match", "token_f1", "rouge_l", "chrf"}
    c = m["comparison"]
    for name in ("exact_match", "token_f1", "rouge_l", "chrf", "perplexity", "preference_accuracy"):
        for side in ("base", "tuned", "diff"):
            assert c[name][side]["low"] <= c[name][side]["value"] <= c[name][side]["high"], (name, side)
    assert m["primary_metric"] == "perplexity" and c["perplexity"]["diff"]["low"] > 0
    assert "prompt_dependence" not in c and "relevance" not in m["gates"]  # check_relevance off: not measured
    assert m["tuned_rouge_l"] == c["rouge_l"]["tuned"]["value"] and "rouge_l_diff_low" in m
    rows = json.loads((out / "row_scores.json").read_text())
    assert rows["split"] == "sft" and len(rows["rows"]) == m["eval_rows"]
    assert mean_loss([(r["logprob"], r["tokens"]) for r in rows["rows"]])[0] == pytest.approx(m["tuned_loss"])
    report = (out / "report.md").read_text()
    assert "passed every gate" in report and "preference accuracy" in report and "ROUGE-L" in report and "### 1." in report


def test_a_worse_model_fails_the_perplexity_gate_and_the_metrics_say_why(workspace):
    with pytest.raises(GateFailed, match=r"primary: perplexity: tuned .* vs base .*relative perplexity reduction -[0-9.]+ \[.*; nothing is registered"):
        evaluate(workspace, -1.0)
    m = json.loads((workspace / "artifacts" / "evaluate" / "metrics.json").read_text())
    assert m["passed"] is False and m["gates"]["primary"]["passed"] is False
    assert m["tuned_perplexity"] > m["base_perplexity"]


def test_samples_are_prompted_with_the_tokenize_stage_ids_and_injection_stays_text(workspace):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from tunepath.evaluate.heldout import Heldout
    from tunepath.evaluate.samples import conversation_prompts, end_of_turn_ids

    tok_dir = workspace / "artifacts" / "tokenize"
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir / "tokenizer"))
    heldout = Heldout.load(tok_dir, workspace / "artifacts" / "validate")
    prompts = conversation_prompts(heldout.rows, heldout.records("conversation"), tokenizer, 8)
    rows = list(load_from_disk(str(tok_dir / "sft" / "eval")))
    assert [p.templated_ids for p in prompts] == [list(r["prompt_ids"]) for r in rows[: len(prompts)]]
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    special = {start, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    injected = next(p for p in prompts if "<|im_start|>system" in p.prompt)
    assert injected.templated_ids.count(start) == 3  # system, user, assistant prompt: the user's text added none
    assert not special & set(injected.raw_ids)
    assert end_of_turn_ids(heldout.rows, tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def ci(value, low=None, high=None):
    return {"value": value, "low": value if low is None else low, "high": value if high is None else high}


def comparison(**over):
    c = {
        "rouge_l": {"base": ci(0.1), "tuned": ci(0.4), "diff": ci(0.3, 0.2, 0.4)},
        "relevance": {"metric": "rouge_l", "own": ci(0.4), "other": ci(0.2), "diff": ci(0.2, 0.1, 0.3)},
        "perplexity": {"base": ci(20.0), "tuned": ci(15.0), "diff": ci(0.25, 0.2, 0.3)},
        "degenerate_share": {"base": ci(1.0), "tuned": ci(0.25), "diff": ci(-0.75)},
        "stopped_at_eot_share": {"base": ci(0.0), "tuned": ci(0.75), "diff": ci(0.75)},
        "preference_accuracy": {"base": ci(0.6), "tuned": ci(0.55), "diff": ci(-0.05, -0.2, 0.1), "pairs": 10},
    }
    for key, value in over.items():
        c[key] = {**c.get(key, {}), **value}
    return c


def test_gates_are_rules_on_intervals_and_name_what_failed():
    cfg = EvaluateConfig(min_stop_share=0.5)
    assert "stop_at_eot" not in apply_gates(EvaluateConfig(), comparison(), "rouge_l", "sft")  # off by default
    assert all(g["passed"] for g in apply_gates(cfg, comparison(), "rouge_l", "sft").values())
    text_only = EvaluateConfig(min_stop_share=0.5, primary_support="none")
    unsure = apply_gates(text_only, comparison(rouge_l={"diff": ci(0.05, -0.01, 0.1)}), "rouge_l", "sft")["primary"]
    assert not unsure["passed"] and "needs lower end > 0.0" in unsure["detail"]  # better on average is not enough
    supported = apply_gates(cfg, comparison(rouge_l={"diff": ci(0.05, -0.01, 0.1)}), "rouge_l", "sft")["primary"]
    assert supported["passed"] and "answer perplexity decides" in supported["detail"]  # reference answers surely likelier
    both_unsure = comparison(rouge_l={"diff": ci(0.05, -0.01, 0.1)}, perplexity={"diff": ci(0.05, -0.02, 0.1)})
    assert not apply_gates(cfg, both_unsure, "rouge_l", "sft")["primary"]["passed"]
    worse = apply_gates(cfg, comparison(rouge_l={"diff": ci(-0.1, -0.2, -0.01)}), "rouge_l", "sft")["primary"]
    assert not worse["passed"] and "surely worse" in worse["detail"]
    assert not apply_gates(cfg, comparison(relevance={"diff": ci(0.01, -0.02, 0.04)}), "rouge_l", "sft")["relevance"]["passed"]
    assert not apply_gates(cfg, comparison(perplexity={"diff": ci(-0.3, -0.4, -0.1)}), "rouge_l", "sft")["perplexity"]["passed"]
    assert apply_gates(cfg, comparison(perplexity={"diff": ci(-0.1, -0.3, 0.05)}), "rouge_l", "sft")["perplexity"]["passed"]
    assert not apply_gates(cfg, comparison(degenerate_share={"tuned": ci(0.75)}), "rouge_l", "sft")["degenerate"]["passed"]
    never_stops = apply_gates(cfg, comparison(stopped_at_eot_share={"tuned": ci(0.25, 0.1, 0.4)}), "rouge_l", "sft")["stop_at_eot"]
    assert not never_stops["passed"] and "25% of tuned answers ended" in never_stops["detail"]
    assert "stop_at_eot" not in apply_gates(cfg, comparison(), "rouge_l", "cpt")  # continuations of text have no turn to end
    below_chance = apply_gates(cfg, comparison(preference_accuracy={"tuned": ci(0.0), "base": ci(0.0), "diff": ci(0.0)}), "rouge_l", "sft")
    assert not below_chance["preference"]["passed"]  # 0% no longer passes because the base was 0% too
    dropped = comparison(preference_accuracy={"tuned": ci(0.6), "base": ci(0.9), "diff": ci(-0.3, -0.45, -0.15)})
    assert not apply_gates(cfg, dropped, "rouge_l", "sft")["preference"]["passed"]
    cpt = apply_gates(cfg, comparison(), "perplexity", "cpt")
    assert "perplexity" not in cpt and cpt["primary"]["metric"] == "perplexity"  # one perplexity rule, the stricter one


def test_relevance_passes_on_prompt_dependence_kept_and_fails_when_training_lost_it():
    # numbers measured on the demo: 20 steps at 1e-4 (answers still mostly the base's) and shuffled labels
    brief = comparison(relevance={"diff": ci(0.049, -0.003, 0.11)},
                       prompt_dependence={"base": ci(0.096, 0.057, 0.142), "tuned": ci(0.119, 0.067, 0.178), "diff": ci(0.023, 0.008, 0.042)})
    shuffled = comparison(relevance={"diff": ci(0.0, -0.054, 0.05)},
                          prompt_dependence={"base": ci(0.096, 0.057, 0.142), "tuned": ci(0.027, 0.017, 0.038), "diff": ci(-0.069, -0.106, -0.037)})
    no_base = comparison(relevance={"diff": ci(0.0, -0.05, 0.05)},  # shuffled on a base that never linked questions to answers
                         prompt_dependence={"base": ci(0.0, -0.01, 0.01), "tuned": ci(0.0, -0.01, 0.01), "diff": ci(0.0, -0.01, 0.01)})
    cfg = EvaluateConfig()
    assert apply_gates(cfg, brief, "rouge_l", "sft")["relevance"]["passed"]
    lost = apply_gates(cfg, shuffled, "rouge_l", "sft")["relevance"]
    assert not lost["passed"] and "prompt dependence (nats per answer token, own prompt vs others) tuned 0.027" in lost["detail"]
    assert not apply_gates(cfg, no_base, "rouge_l", "sft")["relevance"]["passed"]
    assert apply_gates(cfg, {**shuffled, "relevance": comparison()["relevance"]}, "rouge_l", "sft")["relevance"]["passed"]  # answers clearly fit


def test_prompt_dependence_scores_the_same_answer_tokens_after_other_prompts(workspace, demo_assets):
    from tunepath.evaluate.heldout import Heldout
    from tunepath.evaluate.models import load_folder, pick_runtime
    from tunepath.evaluate.scoring import prompt_dependence, prompt_swapped_rows, row_logprobs

    art = workspace / "artifacts"
    rows = [r for r in Heldout.load(art / "tokenize", art / "validate", ["sft"]).splits["sft"] if r.get("prompt_ids")]
    own, other = prompt_swapped_rows(rows, 0), prompt_swapped_rows(rows, 1)
    assert other[0]["input_ids"][: len(rows[1]["prompt_ids"])] == list(rows[1]["prompt_ids"])
    model = load_folder(demo_assets / "models" / "demo", pick_runtime("fp32"))
    counts = [[n for _, n in row_logprobs(model, r, 0, 8)] for r in (own, other)]
    assert counts[0] == counts[1] and min(counts[0]) > 0  # only the answer is scored, the same tokens both times
    gaps = prompt_dependence(model, rows, 0, 8)
    assert len(gaps) == len(rows) and any(abs(g) > 1e-4 for g in gaps)
    alike = [{**r, "prompt_ids": rows[0]["prompt_ids"], "input_ids": list(rows[0]["prompt_ids"]) + list(r["input_ids"][len(r["prompt_ids"]):]),
              "labels": [-100] * len(rows[0]["prompt_ids"]) + list(r["labels"][len(r["prompt_ids"]):])} for r in rows]
    assert max(abs(g) for g in prompt_dependence(model, alike, 0, 8)) < 1e-4  # one prompt for all: nothing to depend on


def test_primary_metric_follows_the_trained_stage_and_an_unknown_one_names_the_param():
    from tunepath.evaluate.gates import primary_metric

    c = comparison()
    assert primary_metric(EvaluateConfig(), ["sft"], c) == "rouge_l"
    assert primary_metric(EvaluateConfig(), ["sft", "dpo"], c) == "preference_accuracy"
    assert primary_metric(EvaluateConfig(), ["cpt"], c) == "perplexity"
    assert primary_metric(EvaluateConfig(), ["sft"], {"perplexity": c["perplexity"]}) == "perplexity"  # nothing generated
    with pytest.raises(ValueError, match="evaluate.primary_metric: 'chrf' was not measured"):
        primary_metric(EvaluateConfig(primary_metric="chrf"), ["sft"], c)
    with pytest.raises(Exception, match="primary_metric"):
        EvaluateConfig(primary_metric="bleu")


def test_preference_summary_counts_pairs_and_reward_accuracy():
    base = [(-10.0, 5, -8.0, 4), (-12.0, 6, -20.0, 6)]
    tuned = [(-7.0, 5, -9.0, 4), (-11.0, 6, -19.0, 6)]
    s = preference_summary(base, tuned)
    assert s["base_accuracy"] == 0.5 and s["tuned_accuracy"] == 1.0
    assert s["base_accuracy_per_token"] == 0.5  # -2.0/token vs -2.0/token is not "above"
    assert s["reward_accuracy"] == 0.5  # pair 1: chosen +3, rejected -1; pair 2: chosen +1, rejected +1


@pytest.mark.parametrize("text, bad", [
    ("", True), ("   ", True), ("the cat the cat the cat the cat", True), ("ok ok ok ok ok ok ok ok ok", True),
    ("答答答答答答答答答答", True), ("Your refund arrives in 3-5 business days.", False), ("Wow!!!!", False), ("in 2000", False),
])
def test_degenerate_answers(text, bad):
    assert is_degenerate(text, 4) is bad


def test_no_label_tokens_is_an_error_that_says_what_to_do():
    with pytest.raises(ValueError, match="eval_share"):
        mean_loss([(0.0, 0)])


def test_task_metrics_count_chinese_and_match_by_words():
    from tunepath.evaluate.textmetrics import chrf, exact_match, rouge_l, token_f1, words

    assert words("Refunds take 5-7 days, OK?") == ["refunds", "take", "5", "7", "days", "ok"]
    assert words("订单已发货") == ["订", "单", "已", "发", "货"]
    assert exact_match("Refunds take 5-7 days.", "refunds take 5-7 days") == 1.0
    assert token_f1("the order shipped", "your order shipped today") == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    zh = "您的订单已于3月5日发货"
    assert rouge_l(zh, zh) == 1.0 and 0 < rouge_l("您的订单已发货", zh) < 1  # rouge-score's own tokenizer scores Chinese 0
    assert chrf(zh, zh) == pytest.approx(1.0) and chrf("退款", zh) < 0.2
    assert rouge_l("", "anything") == 0.0 and token_f1("", "") == 1.0


def test_bootstrap_intervals_are_seeded_paired_and_cover_the_mean():
    from tunepath.evaluate.stats import Bootstrap, mean_ci, paired_diff_ci, perplexity_ci, perplexity_gain_ci

    boot = Bootstrap(resamples=500, confidence=0.9, seed=3)
    x = [float(i % 5) for i in range(40)]
    a = mean_ci(x, boot)
    assert a["low"] < a["value"] < a["high"] and a["value"] == pytest.approx(2.0) and mean_ci(x, boot) == a
    assert mean_ci(x, Bootstrap(500, 0.9, 4)) != a
    wider = mean_ci(x, Bootstrap(500, 0.99, 3))
    assert wider["high"] - wider["low"] > a["high"] - a["low"]
    # paired: a constant improvement on noisy rows is certain, though the two means' intervals overlap
    y = [v + 0.1 for v in x]
    d = paired_diff_ci(y, x, boot)
    assert d["low"] == pytest.approx(0.1) and d["high"] == pytest.approx(0.1) and mean_ci(y, boot)["low"] < a["high"]
    rows = [(-10.0, 5), (-30.0, 10), (-8.0, 4)]
    p = perplexity_ci(rows, boot)
    assert p["value"] == pytest.approx(2.718281828 ** (48 / 19)) and p["low"] <= p["value"] <= p["high"]
    better = [(s / 2, n) for s, n in rows]
    g = perplexity_gain_ci(better, rows, boot)
    assert g["value"] == pytest.approx(1 - 2.718281828 ** (-24 / 19)) and g["low"] > 0


def test_benchmarks_run_offline_for_base_and_tuned_and_gate_the_drop(workspace):
    from tests.conftest import REPO

    folders = [str(REPO / "evals" / "northwind_policy"), str(REPO / "evals" / "general_text")]
    m = evaluate(workspace, 1.0, benchmarks=folders, benchmark_limit=12, max_benchmark_drop=1.0)
    tasks = m["benchmarks"]["tasks"]
    assert set(tasks) == {"northwind_policy", "general_text"}
    assert tasks["northwind_policy"]["metric"] == "acc" and tasks["northwind_policy"]["n"] == 12
    assert 0 <= tasks["northwind_policy"]["tuned"] <= 1 and tasks["northwind_policy"]["tuned_stderr"] > 0
    g = tasks["general_text"]
    assert g["metric"] == "bits_per_byte" and g["higher_is_better"] is False
    assert g["change"] == pytest.approx(g["tuned"] / g["base"] - 1) and m["tuned_bench_general_text"] == g["tuned"]
    assert "| general_text | bits_per_byte |" in (workspace / "artifacts" / "evaluate" / "report.md").read_text()
    # the demo model knows only the store: on general English it is worse than its noised copy (+15% bits per byte
    # here), which the default bound (10%) catches
    assert g["change"] > 0.1
    with pytest.raises(GateFailed, match=r"benchmark:general_text: bits_per_byte tuned .* may rise at most 10%"):
        evaluate(workspace, 1.0, benchmarks=folders[1:], benchmark_limit=12)


@pytest.mark.parametrize("make, message", [
    (lambda d: d, "is not a folder"),
    (lambda d: (d.mkdir(), d)[1], "holds no lm-eval task"),
    (lambda d: (d.mkdir(), (d / "t.yaml").write_text("task: [unclosed\n"), d)[2], "not valid YAML"),
    (lambda d: (d.mkdir(), (d / "t.yaml").write_text("task: mine\nbogus_key_only: 1\n"), d)[2], "does not load task"),
])
def test_a_bad_benchmark_folder_is_a_one_line_error_naming_the_param(tmp_path, make, message):
    from tunepath.evaluate.benchmarks import BenchmarkError, check_folders

    folder = make(tmp_path / "bench")
    with pytest.raises(BenchmarkError, match=f"evaluate.benchmarks: .*{message}") as e:
        check_folders([str(folder)], tmp_path)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def judge_server(demo_assets):
    from tunepath.evaluate.judge_server import start

    server, chat = start(demo_assets / "models" / "demo")
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", chat
    server.shutdown()


def test_the_judge_is_asked_twice_per_prompt_with_positions_swapped_over_real_http(workspace, judge_server):
    from openai import OpenAI

    url, chat = judge_server
    models = OpenAI(base_url=url, api_key="none").models.list()
    assert [m.id for m in models.data] == ["judge"]
    before = chat.requests
    m = evaluate(workspace, 1.0, judge={"base_url": url, "prompts": 3})
    assert chat.requests - before == 6  # 3 prompts, each in both orders
    judge = m["judge"]
    assert len(judge["scores"]) == 3 and all(s in (0.0, 0.25, 0.5, 0.75, 1.0) for s in judge["scores"])
    assert judge["win_rate"]["low"] <= judge["win_rate"]["value"] <= judge["win_rate"]["high"]
    assert "judge" in m["gates"] and "Judge `judge`" in (workspace / "artifacts" / "evaluate" / "report.md").read_text()


def test_an_unreachable_judge_fails_the_stage_naming_the_param(workspace):
    import socket

    from tunepath.evaluate.judge import JudgeUnreachable

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(JudgeUnreachable, match=rf"evaluate.judge.base_url: http://127.0.0.1:{port}/v1 did not answer"):
        evaluate(workspace, 1.0, judge={"base_url": f"http://127.0.0.1:{port}/v1", "prompts": 1})


@pytest.mark.parametrize("reply, expected", [("A", "A"), ("b.", "B"), ("Tie", "tie"), ("Answer B is better", "B"), ("???", None)])
def test_judge_verdicts_are_read_from_the_reply(reply, expected):
    from tunepath.evaluate.judge import verdict

    assert verdict(reply) == expected


def test_preference_at_the_ceiling_is_judged_on_the_margin():
    # the demo's base ranks all 9 held-out pairs right: accuracy cannot rise, the margin can
    ceiling = {"base": ci(1.0), "tuned": ci(1.0), "diff": ci(0.0), "pairs": 9}
    wider = comparison(preference_accuracy=ceiling,
                       preference_margin={"base": ci(0.8, 0.6, 1.0), "tuned": ci(1.1, 0.9, 1.3), "diff": ci(0.3, 0.1, 0.5), "pairs": 9})
    gate = apply_gates(EvaluateConfig(), wider, "preference_accuracy", "dpo")["primary"]
    assert gate["passed"] and gate["metric"] == "preference_margin" and "at the ceiling" in gate["detail"]
    same = comparison(preference_accuracy=ceiling,
                      preference_margin={"base": ci(0.8), "tuned": ci(0.8), "diff": ci(0.0, -0.1, 0.1), "pairs": 9})
    assert not apply_gates(EvaluateConfig(), same, "preference_accuracy", "dpo")["primary"]["passed"]
    lost = comparison(preference_accuracy={**ceiling, "tuned": ci(8 / 9), "diff": ci(-1 / 9, -1 / 3, 0.0)},
                      preference_margin={"base": ci(0.8), "tuned": ci(1.5), "diff": ci(0.7, 0.4, 1.0), "pairs": 9})
    assert not apply_gates(EvaluateConfig(), lost, "preference_accuracy", "dpo")["primary"]["passed"]  # a pair lost
    below = comparison(preference_accuracy={"base": ci(0.7), "tuned": ci(0.9), "diff": ci(0.2, 0.05, 0.35), "pairs": 9})
    assert apply_gates(EvaluateConfig(), below, "preference_accuracy", "dpo")["primary"]["metric"] == "preference_accuracy"


def test_feedback_auc_ranks_desirable_answers_and_its_interval_is_paired():
    from tunepath.evaluate.compare import class_gaps
    from tunepath.evaluate.stats import Bootstrap, auc_ci

    labels = [True, True, True, False, False, False]
    base = [-1.0, -3.0, -2.5, -2.0, -4.0, -0.5]  # 4 of the 9 desirable-undesirable pairs in the right order
    tuned = [-0.5, -1.0, -1.5, -3.0, -4.0, -2.0]  # every desirable answer above every undesirable one
    out = auc_ci(tuned, base, labels, Bootstrap(500))
    assert out["base"]["value"] == pytest.approx(4 / 9) and out["tuned"]["value"] == 1.0
    assert out["diff"]["value"] == pytest.approx(5 / 9) and out["diff"]["low"] <= out["diff"]["value"] <= out["diff"]["high"]
    tied = auc_ci([0.0] * 6, [0.0] * 6, labels, Bootstrap(50))
    assert tied["tuned"]["value"] == 0.5  # ties count half
    assert sum(class_gaps(tuned, labels)) / 6 == pytest.approx(-1.0 - (-3.0))  # mean desirable minus mean undesirable

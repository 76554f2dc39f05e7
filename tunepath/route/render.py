"""plan.md: the route explained for a person (also the Prefect markdown artifact and the CLI's output)."""

from __future__ import annotations

from tunepath.route.plan import RoutePlan
from tunepath.route.profile import Profile

SCENARIOS = {
    1: "new model from scratch",
    2: "much unlabelled domain data",
    3: "labelled data for a task",
    4: "strict grounding",
    5: "styled domain assistant",
    6: "limited resources",
}


def render_markdown(plan: RoutePlan, profile: Profile | None = None) -> str:
    stages = " → ".join(plan.stages) if plan.stages else "none (training not advised)"
    lines = [
        "# Training route",
        "",
        f"- **Stages:** {stages}",
        f"- **Method:** {plan.method}",
        f"- **Start from:** {plan.start_from}",
        f"- **Retrieval:** {plan.retrieval}",
        f"- **Forced by params:** {'yes' if plan.forced else 'no'}",
        "",
        "## Why",
        "",
        "| rule | scenario | reason |",
        "|---|---|---|",
    ]
    for r in plan.rules:
        scenario = f"{r.scenario}: {SCENARIOS[r.scenario]}" if r.scenario else "-"
        lines.append(f"| {r.id} | {scenario} | {escape(r.reason)} |")
    if plan.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in plan.warnings]
    lines += render_train(plan)
    lines += render_memory(plan.memory)
    if profile is not None:
        lines += render_profile(profile)
    return "\n".join(lines) + "\n"


def render_train(plan: RoutePlan) -> list[str]:
    t = plan.train
    if not t:
        return []
    who = {"params": "set in params, kept", "route": "chosen by the route", "default": "default (no GPU to fit)"}
    lines = ["", "## Training knobs", "",
             f"- **train.gradient_checkpointing:** {str(t['gradient_checkpointing']).lower()} ({who[t['set_by']['gradient_checkpointing']]})",
             f"- **train.checkpoint_offload:** {str(t.get('checkpoint_offload', False)).lower()} "
             f"({who[t['set_by'].get('checkpoint_offload', 'default')]})",
             f"- **train.micro_batch_tokens:** {t['micro_batch_tokens']:,} ({t['micro_batch_rows']} row(s) per micro-batch; "
             f"{who[t['set_by']['micro_batch_tokens']]})",
             f"- **backend:** {t['backend']}"]
    if t.get("tokens_per_second") is not None:
        measured = "measured path" if t["speed_measured"] else "derived from the measured paths"
        hours = f", {t['hours']:,.1f} h for the plan's stages" if t.get("hours") is not None else ""
        lines.append(f"- **Expected speed:** ≈ {t['tokens_per_second']:,} tokens/s per GPU ({measured}){hours}")
    return lines


def render_memory(memory: dict) -> list[str]:
    inputs = memory["inputs"]
    gpus = memory["gpus"]
    avail = memory["available_gb"]
    where = f"{avail:,.2f} GB available per GPU on {gpus} GPU(s)" if avail is not None else "no GPU (CPU): nothing to fit"
    lines = [
        "",
        "## Memory estimate per GPU (GB = 1e9 bytes), each method with the knobs chosen for it",
        "",
        f"{where}. Model: {inputs['params'] / 1e9:g}B parameters, hidden {inputs['hidden_size']}, {inputs['num_layers']} layers, "
        f"MLP {inputs['intermediate_size']}, vocabulary {inputs['vocab_size']:,}"
        + (f" (derived: {', '.join(inputs['derived'])})" if inputs["derived"] else "")
        + f"; max_length {inputs['max_length']}, LoRA rank {inputs['lora_rank']}.",
        "",
        "| method | checkpointing | micro-batch tokens | weights | gradients | optimizer | activations | overhead | total | fits | tokens/s | hours |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, parts in memory["breakdown_gb"].items():
        fits = {True: "yes", False: "no", None: "-"}[memory["fits"][method]]
        h = memory.get("hours", {}).get(method)
        k = memory.get("knobs", {}).get(method, {})
        speed = k.get("tokens_per_second")
        knob_cells = [("on" if k.get("gradient_checkpointing") else "off") if k else "-",
                      f"{k['micro_batch_rows'] * inputs['max_length']:,}" if k else "-"]
        cells = [f"{parts[key]:,.2f}" for key in ("weights", "gradients", "optimizer", "activations", "overhead")]
        total = f"{memory['per_gpu_gb'][method]:,.2f}"
        lines.append(f"| {method} | " + " | ".join(knob_cells + cells) + f" | {total} | {fits} | "
                     f"{'-' if speed is None else f'{speed:,}'} | {'-' if h is None else f'{h:,.1f}'} |")
    lines += ["", f"Formula: {memory['formula']}"]
    steps = memory.get("max_steps")
    if steps:
        per = ", ".join(f"{m} {'-' if h is None else f'{h:,.1f}'}" for m, h in steps["hours"].items())
        lines += ["", f"train.max_steps: {steps['max_steps']:,} optimizer steps per stage × at most "
                      f"{steps['tokens_per_step']:,} tokens per step = {steps['max_steps'] * steps['tokens_per_step']:,} "
                      f"tokens per stage; hours at that step count: {per}"
                      + (" (no GPU: no time estimate)" if all(h is None for h in steps["hours"].values()) else "")]
    return lines


def render_profile(profile: Profile) -> list[str]:
    lines = ["", "## Profile", ""]
    for part, values in profile.model_dump().items():
        shown = ", ".join(f"{k}={v}" for k, v in values.items() if v is not None)
        lines.append(f"- **{part}:** {shown}")
    return lines


def escape(text: str) -> str:
    return text.replace("|", "\\|")

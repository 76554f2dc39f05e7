"""`tunepath route`: plan a training route from a profile file, without running anything.

Usage:
    tunepath route --profile examples/profiles/limited_lora.yaml
    tunepath route --profile my.json --json
    tunepath route --profile my.yaml --max-length 4096 --set sft_min_examples=50 --set force_method=lora
    tunepath route --profile my.yaml --no-gradient-checkpointing --micro-batch-tokens 4096   # train.* knobs kept as set

The profile (YAML or JSON) has four parts: data, resources, model, intent (see docs/routing.md).
Thresholds come from the route section's defaults; change them with --set KEY=VALUE (VALUE is read as YAML).
The route chooses train.gradient_checkpointing and train.micro_batch_tokens unless the flags set them.
Exit status 0 with the plan on stdout; 2 with one line on stderr naming the bad field, or the forced setting
that cannot fit the GPU (with the estimate and what would fit).
"""

from __future__ import annotations

import argparse
import json
import sys

from tunepath.route.config import RouteConfig
from tunepath.route.profile import ProfileError, describe_validation_error, load_profile


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunepath route",
        description="Choose a training route (stages, method, start point, retrieval) from a data/hardware/model/intent profile.",
    )
    parser.add_argument("--profile", required=True, metavar="FILE", help="Profile file, YAML or JSON.")
    parser.add_argument("--json", action="store_true", help="Print the plan as JSON instead of the explanation.")
    parser.add_argument("--max-length", type=int, default=2048, help="Tokens per training row (tokenize.max_length, default 2048).")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="Rows per GPU per optimizer step (train.batch_size, default 8); the route splits them into micro-batches.")
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank for the memory estimate (default 16).")
    gc = parser.add_mutually_exclusive_group()
    gc.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_const", const=True, default=None,
                    help="train.gradient_checkpointing true, kept as set (default: the route chooses).")
    gc.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_const", const=False,
                    help="train.gradient_checkpointing false, kept as set.")
    off = parser.add_mutually_exclusive_group()
    off.add_argument("--checkpoint-offload", dest="checkpoint_offload", action="store_const", const=True, default=None,
                     help="train.checkpoint_offload true, kept as set (default: the route chooses).")
    off.add_argument("--no-checkpoint-offload", dest="checkpoint_offload", action="store_const", const=False,
                     help="train.checkpoint_offload false, kept as set.")
    parser.add_argument("--micro-batch-tokens", type=int, default=None, metavar="N",
                        help="train.micro_batch_tokens, kept as set (default: the route chooses; 0 never splits).")
    parser.add_argument("--backend", choices=("auto", "hf", "unsloth"), default="auto",
                        help="train.backend (default auto: unsloth for QLoRA on one GPU when unsloth is installed here).")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="Training runs without compiled layers (train.compile false, or runs under 200 steps).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override a route threshold, e.g. sft_min_examples=50.")
    return parser


# RouteConfig keys that the profile file carries instead (the route stage copies them into the profile).
IN_PROFILE = {
    "goal": "intent.goal", "strict_grounding": "intent.strict_grounding", "style_required": "intent.style_required",
    "gpus": "resources.gpus", "gpu_memory_gb": "resources.gpu_memory_gb",
    "time_budget_hours": "resources.time_budget_hours", "params_b": "model.params_b",
}


def parse_overrides(items: list[str]) -> RouteConfig:
    import yaml
    from pydantic import ValidationError

    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ProfileError(f"--set {item!r}: write KEY=VALUE, e.g. --set sft_min_examples=50")
        if key in IN_PROFILE:
            raise ProfileError(f"--set {key}: this command reads it from the profile; set profile.{IN_PROFILE[key]} there")
        values[key] = yaml.safe_load(value)
    try:
        return RouteConfig.model_validate(values)
    except ValidationError as e:
        raise ProfileError(describe_validation_error(e, prefix="route")) from e


def route_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("max_length", "batch_size", "lora_rank"):
        if getattr(args, name) < 1:
            print(f"tunepath route: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.micro_batch_tokens is not None and args.micro_batch_tokens < 0:
        print("tunepath route: --micro-batch-tokens must be >= 0", file=sys.stderr)
        return 2
    try:
        cfg = parse_overrides(args.set)
        profile = load_profile(args.profile)
    except ProfileError as e:
        print(f"tunepath route: {e}", file=sys.stderr)
        return 2

    import importlib.util

    from tunepath.params import ConfigError
    from tunepath.route.knobs import TrainSettings
    from tunepath.route.plan import plan_route
    from tunepath.route.render import render_markdown

    settings = TrainSettings(
        max_length=args.max_length, batch_size=args.batch_size, lora_rank=args.lora_rank,
        gradient_checkpointing=args.gradient_checkpointing, micro_batch_tokens=args.micro_batch_tokens,
        checkpoint_offload=args.checkpoint_offload,
        compile=args.compile, backend=args.backend, unsloth=importlib.util.find_spec("unsloth") is not None,
    )
    try:
        plan = plan_route(profile, cfg, settings)
    except ConfigError as e:
        print(f"tunepath route: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**plan.model_dump(mode="json"), "profile": profile.model_dump(mode="json")}, indent=2, ensure_ascii=False))
    else:
        print(render_markdown(plan, profile), end="")
    return 0


if __name__ == "__main__":
    sys.exit(route_main())

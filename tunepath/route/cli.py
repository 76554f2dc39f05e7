"""`tunepath route`: plan a training route from a profile file, without running anything.

Usage:
    tunepath route --profile examples/profiles/limited_lora.yaml
    tunepath route --profile my.json --json
    tunepath route --profile my.yaml --max-length 4096 --set sft_min_examples=50 --set force_method=lora

The profile (YAML or JSON) has four parts: data, resources, model, intent (see docs/routing.md).
Thresholds come from the route section's defaults; change them with --set KEY=VALUE (VALUE is read as YAML).
Exit status 0 with the plan on stdout; 2 with one line on stderr naming the bad field.
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
    parser.add_argument("--max-length", type=int, default=2048, help="Tokens per training row for the memory estimate (default 2048).")
    parser.add_argument("--batch-size", type=int, default=1, help="Rows per GPU per step for the memory estimate (default 1).")
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank for the memory estimate (default 16).")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="Training recomputes activations (train.gradient_checkpointing): the estimate keeps one layer's.")
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
    try:
        cfg = parse_overrides(args.set)
        profile = load_profile(args.profile)
    except ProfileError as e:
        print(f"tunepath route: {e}", file=sys.stderr)
        return 2

    from tunepath.route.plan import plan_route
    from tunepath.route.render import render_markdown

    plan = plan_route(profile, cfg, max_length=args.max_length, batch_size=args.batch_size, lora_rank=args.lora_rank,
                      gradient_checkpointing=args.gradient_checkpointing)
    if args.json:
        print(json.dumps({**plan.model_dump(mode="json"), "profile": profile.model_dump(mode="json")}, indent=2, ensure_ascii=False))
    else:
        print(render_markdown(plan, profile), end="")
    return 0


if __name__ == "__main__":
    sys.exit(route_main())

"""The route stage: scenario rules (seed §3.3) + a memory estimate → a RoutePlan (stages, method, start, why).

    from tunepath.route import RouteConfig, Profile, TrainSettings, plan_route
    plan = plan_route(profile, RouteConfig(), TrainSettings(max_length=2048, batch_size=8, lora_rank=16))
    plan.train    # the knobs chosen (gradient checkpointing, micro-batch tokens), who set them, tokens/s, hours

Every module here imports only the standard library and pydantic at top level; torch and transformers are
imported inside `run_route` when it counts a model's parameters or detects GPUs.
"""

from tunepath.route.config import Goal, Method, RouteConfig, Stage
from tunepath.route.knobs import TrainSettings
from tunepath.route.profile import Profile, ProfileError, load_profile, parse_profile
from tunepath.route.plan import RoutePlan, RuleHit, plan_route, plan_tags
from tunepath.route.render import render_markdown
from tunepath.route.stage import run_route

__all__ = [
    "Goal", "Method", "Profile", "ProfileError", "RouteConfig", "RoutePlan", "RuleHit", "Stage", "TrainSettings",
    "load_profile", "parse_profile", "plan_route", "plan_tags", "render_markdown", "run_route",
]

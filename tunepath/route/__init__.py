"""The route stage: scenario rules (seed §3.3) + a memory estimate → a RoutePlan (stages, method, start, why).

    from tunepath.route import RouteConfig, Profile, plan_route
    plan = plan_route(profile, RouteConfig(), max_length=2048, batch_size=8, lora_rank=16)

Every module here imports only the standard library and pydantic at top level; torch and transformers are
imported inside `run_route` when it counts a model's parameters or detects GPUs.
"""

from tunepath.route.config import Goal, Method, RouteConfig, Stage
from tunepath.route.profile import Profile, ProfileError, load_profile, parse_profile
from tunepath.route.plan import RoutePlan, RuleHit, plan_route, plan_tags
from tunepath.route.render import render_markdown
from tunepath.route.stage import run_route

__all__ = [
    "Goal", "Method", "Profile", "ProfileError", "RouteConfig", "RoutePlan", "RuleHit", "Stage",
    "load_profile", "parse_profile", "plan_route", "plan_tags", "render_markdown", "run_route",
]

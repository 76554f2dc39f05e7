"""promote_model and rollback_champion: the decisions, the alias moves, and their record in the registry.

Aliases: `candidate` (set by the register stage), `champion` (what serves), `previous` (the champion before it).
The registered model's tag `promotion.history` lists the versions that were champion, so rollback can step back
more than once. Every decision is written on the candidate version as `promotion.*` tags.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from tunepath.promote import PromoteConfig
from tunepath.promote.decide import compare
from tunepath.promote.registry import PromotionError, Registry
from tunepath.promote.report import comparison_markdown

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous"


def promote_model(cfg: PromoteConfig, name: str, tracking_uri: str, force: bool = False) -> dict:
    """Move `champion` to the `candidate` version when it is better (or when forced); returns the decision record."""
    registry = Registry.open(name, tracking_uri)
    candidate = registry.alias(CANDIDATE)
    if candidate is None:
        raise PromotionError(f"{name!r} has no version with alias @{CANDIDATE}; `tunepath run` registers one")
    champion = registry.alias(CHAMPION)
    record = {"model": name, "candidate": _describe(candidate), "champion": _describe(champion) if champion else None,
              "forced": force, "compared_on": "none", "checks": [], "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    if champion is not None and str(champion.version) == str(candidate.version):
        record.update(decision="unchanged", reason=f"version {candidate.version} is already @{CHAMPION}")
        return _finish(registry, record, str(champion.version), tag=False)
    if force:
        record.update(decision="promoted", reason="forced with --force: comparison skipped")
        return _promote(registry, record, candidate, champion)
    if candidate.tags.get("promotion.rolled_back") == "true":
        record.update(decision="rejected", reason=f"version {candidate.version} was rolled back from @{CHAMPION}; "
                                                    "promote it again only with --force")
        return _finish(registry, record, str(champion.version) if champion else None)
    if candidate.tags.get("eval.passed") != "True":
        record.update(decision="rejected", reason="the candidate did not pass its evaluation gates (tag eval.passed)")
        return _finish(registry, record, str(champion.version) if champion else None)
    if champion is None:
        record.update(decision="promoted", reason=f"first @{CHAMPION}: the candidate passed its evaluation gates "
                                                    f"(perplexity {record['candidate']['perplexity']} vs base {candidate.tags.get('eval.base_perplexity')})")
        return _promote(registry, record, candidate, None)

    comparison, primary, why = comparable_evidence(registry, candidate, champion)
    if comparison is None:
        record.update(decision="rejected", reason=why)
        return _finish(registry, record, str(champion.version))
    record["compared_on"] = why
    ppl = comparison["perplexity"]
    record["candidate"]["perplexity"], record["champion"]["perplexity"] = ppl["tuned"]["value"], ppl["base"]["value"]
    record["primary_metric"] = primary
    record["comparison"] = comparison
    verdict = compare(cfg, comparison, primary)
    record["checks"] = verdict.checks
    record.update(decision="promoted" if verdict.promote else "rejected", reason=verdict.reason)
    if verdict.promote:
        return _promote(registry, record, candidate, champion)
    return _finish(registry, record, str(champion.version))


def comparable_evidence(registry: Registry, candidate, champion) -> tuple[dict | None, str | None, str]:
    """Both versions compared row by row on the same held-out data: from their logged evaluations when those were
    measured the same way, else re-measured on the candidate's held-out split."""
    from tunepath.promote.reevaluate import recorded, reevaluate

    ct, pt = candidate.tags, champion.tags
    if ct.get("tokenizer_hash") and pt.get("tokenizer_hash") and ct["tokenizer_hash"] != pt["tokenizer_hash"]:
        return None, None, ("candidate and champion use different tokenizers or chat templates: their perplexities are not "
                            "comparable. Compare them by hand and promote with --force if the candidate is better")
    same = ct.get("eval.fingerprint") and ct.get("eval.fingerprint") == pt.get("eval.fingerprint") and ct.get("data_hash") == pt.get("data_hash")
    found = recorded(registry, candidate, champion) if same else None
    if found is not None:
        comparison, primary, info = found
        return comparison, primary, (f"recorded: both evaluated on the same held-out data with the same settings "
                                     f"({info['rows']} {info['split']} rows, {info['samples']} answers each), compared row by row")
    comparison, primary, info = reevaluate(registry, candidate, champion)
    return comparison, primary, (f"re-evaluated: both measured on the candidate's held-out {info['split']} split "
                                 f"({info['rows']} rows, {info['samples']} answers, {info['precision']})")


def rollback_champion(name: str, tracking_uri: str) -> dict:
    """Point `champion` back at `previous`; `previous` then steps one further back in the history."""
    registry = Registry.open(name, tracking_uri)
    champion, previous = registry.alias(CHAMPION), registry.alias(PREVIOUS)
    if previous is None:
        raise PromotionError(f"{name!r} has no @{PREVIOUS} version to roll back to (it is set when a promotion replaces a champion)")
    target = str(previous.version)
    history = registry.history()
    if target in history:
        history = history[: len(history) - history[::-1].index(target)]
    else:
        history.append(target)
    earlier = [v for v in history[:-1] if v != target]
    registry.point(CHAMPION, target)
    if earlier:
        registry.point(PREVIOUS, earlier[-1])
    else:
        registry.drop(PREVIOUS)
    registry.set_history(history)
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    reason = f"rolled back: @{CHAMPION} moved from version {champion.version if champion else 'none'} to version {target}"
    if champion is not None:
        registry.tag(champion.version, {"promotion.decision": "rolled_back", "promotion.reason": reason, "promotion.at": at,
                                        "promotion.rolled_back": "true"})
    log.info(reason)
    return {"model": name, "decision": "rolled_back", "reason": reason, "forced": False, "at": at, "compared_on": "none", "checks": [],
            "candidate": None, "champion": _describe(champion) if champion else None, "champion_after": target,
            "previous_after": earlier[-1] if earlier else None}


def _describe(version) -> dict:
    tags = version.tags
    return {"version": str(version.version), "run_id": version.run_id, "perplexity": tags.get("eval.perplexity"),
            "data_hash": tags.get("data_hash"), "git_commit": tags.get("git_commit")}


def _promote(registry: Registry, record: dict, candidate, champion) -> dict:
    history = registry.history()
    if champion is not None and (not history or history[-1] != str(champion.version)):
        history.append(str(champion.version))  # a champion set by hand still belongs to the history
    history.append(str(candidate.version))
    if champion is not None:
        registry.point(PREVIOUS, champion.version)
    registry.point(CHAMPION, candidate.version)
    registry.set_history(history)
    return _finish(registry, record, str(candidate.version))


def _finish(registry: Registry, record: dict, champion_after: str | None, tag: bool = True) -> dict:
    record["champion_after"] = champion_after
    previous = registry.alias(PREVIOUS)
    record["previous_after"] = str(previous.version) if previous else None
    if tag:
        champ = record["champion"] or {}
        registry.tag(record["candidate"]["version"], {
            "promotion.decision": record["decision"],
            "promotion.reason": record["reason"],
            "promotion.candidate_ppl": record["candidate"]["perplexity"],
            "promotion.champion_ppl": champ.get("perplexity") or "",
            "promotion.champion_version": champ.get("version") or "",
            "promotion.compared_on": record["compared_on"],
            **({"promotion.primary_metric": record["primary_metric"], "promotion.comparison": comparison_markdown(record)}
               if record.get("comparison") else {}),
            "promotion.forced": str(record["forced"]).lower(),
            "promotion.at": record["at"],
            **({"promotion.rolled_back": "false"} if record["decision"] == "promoted" else {}),
        })
    log.info("%s: %s (%s)", registry.name, record["decision"], record["reason"])
    return record

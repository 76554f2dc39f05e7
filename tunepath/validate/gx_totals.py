"""GX results of chunks merged into the results of one run over the whole data (report.json's `gx`, gx_results.json)."""

from __future__ import annotations

import json


class GXTotals:
    """The GX summaries and results of every chunk as one run over the whole data would give them.

    Counts add up, percentages are recomputed, and the indexes of unexpected rows are offset by the rows of the
    chunks before, so they index the whole data's frame (in row order) as before.
    """

    PARTIAL = 20  # GX's partial lists hold the first 20 unexpected values

    def __init__(self) -> None:
        self.summaries: dict[str, dict] = {}
        self.results: dict[str, dict] = {}

    def ordered(self) -> None:
        """Suites in the order one run over all the data gives them: kinds, then frames, as `check_contracts` runs them."""
        kinds = ("conversation", "preference", "feedback", "text")
        frames = ("messages", "records", "calls")

        def rank(suite: str):
            kind, _, frame = suite.partition("_")
            return kinds.index(kind), frames.index(frame) if frame else 0

        self.summaries = {k: self.summaries[k] for k in sorted(self.summaries, key=rank)}
        self.results = {k: self.results[k] for k in sorted(self.results, key=rank)}

    def add(self, summaries: dict, results: dict) -> None:
        for suite, summary in summaries.items():
            offset = self.summaries[suite]["rows"] if suite in self.summaries else 0
            if suite not in self.summaries:
                self.summaries[suite], self.results[suite] = summary, results[suite]
                continue
            self._summary(self.summaries[suite], summary)
            self._result(self.results[suite], results[suite], offset)

    @staticmethod
    def _statistics(successes: list[bool]) -> dict:
        n, ok = len(successes), sum(successes)
        return {"evaluated_expectations": n, "successful_expectations": ok, "unsuccessful_expectations": n - ok,
                "success_percent": ok / n * 100 if n else None}

    def _summary(self, total: dict, more: dict) -> None:
        total["success"] = total["success"] and more["success"]
        total["rows"] += more["rows"]
        by_rule = {(e["code"], e["column"]): e for e in more["expectations"]}
        for e in total["expectations"]:
            other = by_rule[(e["code"], e["column"])]
            e["success"] = e["success"] and other["success"]
            e["unexpected_count"] += other["unexpected_count"]
        total["statistics"] = self._statistics([e["success"] for e in total["expectations"]])

    def _result(self, total: dict, more: dict, offset: int) -> None:
        total["success"] = total["success"] and more["success"]
        key = lambda res: (res["expectation_config"]["meta"]["code"], res["expectation_config"]["kwargs"]["column"])  # noqa: E731
        by_rule = {key(res): res for res in more["results"]}
        for res in total["results"]:
            other = by_rule[key(res)]
            res["success"] = res["success"] and other["success"]
            a, b = res["result"], other["result"]
            for name in ("element_count", "unexpected_count", "missing_count"):
                if name in a:
                    a[name] += b.get(name, 0)
            elements, unexpected, missing = a.get("element_count", 0), a.get("unexpected_count", 0), a.get("missing_count", 0)
            present = elements - missing
            if "unexpected_percent" in a:
                a["unexpected_percent"] = unexpected / present * 100 if present else None
            if "missing_percent" in a:
                a["missing_percent"] = missing / elements * 100 if elements else None
            if "unexpected_percent_total" in a:
                a["unexpected_percent_total"] = unexpected / elements * 100 if elements else None
            if "unexpected_percent_nonmissing" in a:
                a["unexpected_percent_nonmissing"] = unexpected / present * 100 if present else None
            if "partial_unexpected_list" in a:
                a["partial_unexpected_list"] = (a["partial_unexpected_list"] + b.get("partial_unexpected_list", []))[:self.PARTIAL]
            for name in ("partial_unexpected_index_list", "unexpected_index_list"):
                if name in a:
                    merged = a[name] + [i + offset for i in b.get(name, [])]
                    a[name] = merged[:self.PARTIAL] if name.startswith("partial") else merged
            if "partial_unexpected_counts" in a:
                counts: dict = {}
                for entry in a["partial_unexpected_counts"] + b.get("partial_unexpected_counts", []):
                    k = json.dumps(entry["value"], sort_keys=True, default=str)
                    counts.setdefault(k, {"value": entry["value"], "count": 0})["count"] += entry["count"]
                a["partial_unexpected_counts"] = sorted(counts.values(), key=lambda e: (-e["count"], str(e["value"])))[:self.PARTIAL]
        total["statistics"] = self._statistics([res["success"] for res in total["results"]])

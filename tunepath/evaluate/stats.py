"""Bootstrap confidence intervals: of a mean, of a paired difference, of a token-weighted perplexity.

Every interval of one evaluation resamples the same row indices (one seeded generator per call with the same seed),
so base and tuned are compared on identical resamples: the paired bootstrap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are drawn: resamples, two-sided confidence (0.95), seed."""

    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def indices(self, n: int):
        import numpy as np

        return np.random.default_rng(self.seed).integers(0, n, size=(self.resamples, n))

    def bounds(self, values) -> tuple[float, float]:
        import numpy as np

        tail = (1 - self.confidence) / 2 * 100
        low, high = np.percentile(values, [tail, 100 - tail])
        return float(low), float(high)


def interval(point: float, low: float, high: float) -> dict:
    return {"value": point, "low": low, "high": high}


def mean_ci(values: list[float], boot: Bootstrap) -> dict:
    """The mean of per-row values with its percentile interval."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return interval(float("nan"), float("nan"), float("nan"))
    means = x[boot.indices(len(x))].mean(axis=1)
    return interval(float(x.mean()), *boot.bounds(means))


def paired_diff_ci(tuned: list[float], base: list[float], boot: Bootstrap) -> dict:
    """mean(tuned) - mean(base) over the same rows, resampled together."""
    import numpy as np

    d = np.asarray(tuned, dtype=float) - np.asarray(base, dtype=float)
    return mean_ci(d.tolist(), boot)


def perplexity_ci(scores: list[tuple[float, int]], boot: Bootstrap) -> dict:
    """Token-weighted perplexity of rows (summed log-prob, tokens), resampling rows."""
    import numpy as np

    lp, tok = (np.asarray(v, dtype=float) for v in zip(*scores))
    idx = boot.indices(len(lp))
    ppl = np.exp(np.minimum(-lp[idx].sum(1) / np.maximum(tok[idx].sum(1), 1), 700.0))
    return interval(math.exp(min(-lp.sum() / max(tok.sum(), 1), 700.0)), *boot.bounds(ppl))


def perplexity_gain_ci(tuned: list[tuple[float, int]], base: list[tuple[float, int]], boot: Bootstrap) -> dict:
    """Relative perplexity reduction 1 - ppl(tuned)/ppl(base) on the same resampled rows (positive: tuned better)."""
    import numpy as np

    lt, tok = (np.asarray(v, dtype=float) for v in zip(*tuned))
    lb = np.asarray([s for s, _ in base], dtype=float)
    idx = boot.indices(len(lt))

    def gain(t, b, n):
        return 1 - np.exp(np.clip((b - t) / np.maximum(n, 1), -700.0, 700.0))

    point = float(gain(lt.sum(), lb.sum(), tok.sum()))
    return interval(point, *boot.bounds(gain(lt[idx].sum(1), lb[idx].sum(1), tok[idx].sum(1))))


def auc_ci(tuned: list[float], base: list[float], positive: list[bool], boot: Bootstrap) -> dict:
    """Area under the ROC curve of a per-row score separating positive from negative rows (Mann-Whitney: the chance
    that a random positive row outscores a random negative one, ties half), for both models and their paired
    difference, on the same resampled rows. {"base", "tuned", "diff"}, each an interval."""
    import numpy as np
    from scipy.stats import rankdata

    pos = np.asarray(positive, dtype=bool)
    scores = {"tuned": np.asarray(tuned, dtype=float), "base": np.asarray(base, dtype=float)}
    nan = interval(float("nan"), float("nan"), float("nan"))
    if pos.all() or not pos.any():
        return {"base": nan, "tuned": nan, "diff": nan}

    def auc(x, p):
        ranks = rankdata(x, axis=-1)
        n_pos = p.sum(axis=-1)
        n_neg = p.shape[-1] - n_pos
        with np.errstate(invalid="ignore", divide="ignore"):
            return ((ranks * p).sum(axis=-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)

    idx = boot.indices(len(pos))
    out = {}
    resampled = {}
    for side, x in scores.items():
        resampled[side] = auc(x[idx], pos[idx])  # NaN for a resample with one class only: left out below
        keep = resampled[side][np.isfinite(resampled[side])]
        out[side] = interval(float(auc(x, pos)), *boot.bounds(keep))
    d = resampled["tuned"] - resampled["base"]
    out["diff"] = interval(out["tuned"]["value"] - out["base"]["value"], *boot.bounds(d[np.isfinite(d)]))
    return out

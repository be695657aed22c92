"""Statistics of paired comparisons over seeds, in pure Python (no scipy in the environment).

:func:`paired` takes a metric per seed for two variants and gives the per-seed differences,
their mean and sd, a 95% Student t-interval and an exact two-sided sign test;
:func:`verdict` reads the interval. :func:`t_cdf` / :func:`t_ppf` are Student's t
distribution through the regularised incomplete beta function (:func:`betainc`).
"""
import math
import statistics
from typing import Dict

__all__ = ["betainc", "t_cdf", "t_ppf", "sign_test_p", "paired", "verdict"]


def _betacf(a: float, b: float, x: float) -> float:
    # continued fraction of the regularised incomplete beta function (Lentz's method)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        even = m * (b - m) * x / ((a + m2 - 1) * (a + m2))
        odd = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))
        for num in (even, odd):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1.0 - x)
    # the continued fraction converges fast only below this point: use the symmetry above it
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """CDF of Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: int) -> float:
    """Quantile of Student's t (bisection on :func:`t_cdf`), 0.5 < q < 1."""
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def sign_test_p(pos: int, neg: int) -> float:
    """Exact two-sided sign test (ties dropped): P(a split at least this uneven | p = 1/2)."""
    n = pos + neg
    if n == 0:
        return 1.0
    k = min(pos, neg)
    return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n)


def paired(a: Dict[int, float], b: Dict[int, float]) -> dict:
    """Paired differences a[s] - b[s] over the seeds both have: mean, sd, 95% t-interval,
    and the exact sign test (its smallest two-sided p with n pairs is 2 / 2^n: 0.0625 at n = 5).

    A seed whose value is NaN or infinite on either side (a diverged run) is left out of every
    statistic and listed in ``non_finite_seeds``, so it shows instead of poisoning the mean
    (``statistics.stdev`` cannot even take it) or counting as a tie.

    Returns {"seeds", "diffs", "n", "mean", "sd", "ci95": [lo, hi] or None (n < 2),
    "sign": {"pos", "neg", "ties", "p"}, "non_finite_seeds"}.
    """
    common = sorted(set(a) & set(b))
    non_finite = [s for s in common if not (math.isfinite(a[s]) and math.isfinite(b[s]))]
    seeds = [s for s in common if s not in non_finite]
    d = [a[s] - b[s] for s in seeds]
    n = len(d)
    res = {"seeds": seeds, "diffs": d, "n": n, "mean": statistics.mean(d) if d else float("nan")}
    if n >= 2:
        sd = statistics.stdev(d)
        half = t_ppf(0.975, n - 1) * sd / math.sqrt(n)
        res.update(sd=sd, ci95=[res["mean"] - half, res["mean"] + half])
    else:
        res.update(sd=float("nan"), ci95=None)
    pos, neg = sum(x > 0 for x in d), sum(x < 0 for x in d)
    res.update(sign={"pos": pos, "neg": neg, "ties": n - pos - neg, "p": sign_test_p(pos, neg)},
               non_finite_seeds=non_finite)
    return res


MIN_PAIRS_TO_ESTABLISH = 5


def verdict(p: dict, min_pairs: int = MIN_PAIRS_TO_ESTABLISH) -> str:
    """What the 95% interval of :func:`paired`'s result ``p`` establishes about a - b.

    An interval that excludes 0 from fewer than ``min_pairs`` seeds (default 5, the experiment's
    planned minimum) is reported as "suggested", not "established": with 2-4 seeds the t-interval
    rests on a standard deviation from 1-3 degrees of freedom, which two runs that happen to agree
    make spuriously narrow."""
    if p["ci95"] is None:
        return "n/a (fewer than 2 pairs)"
    lo, hi = p["ci95"]
    if lo > 0 or hi < 0:
        side = "higher" if lo > 0 else "lower"
        if p["n"] < min_pairs:
            return f"suggested: {side} (n = {p['n']} < {min_pairs} seeds)"
        return f"established: {side}"
    return "not established"

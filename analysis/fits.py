"""Scaling-law fits: pure functions over DataFrames/arrays returning plain records with bootstrap CIs.

- :func:`fit_loglinear`: L = a + b log10(vocab) (paper Fig. 5: L = 2.6754 - 0.0256 log10 m on OLMoE-1.3B).
- :func:`fit_chinchilla`: L(N, D) = E + A/N^alpha + B/D^beta as Hoffmann et al. (2022) and Besiroglu et al.
  (2024, "Chinchilla scaling: a replication attempt") fit it: the *sum* of Huber losses (delta 1e-3) between
  the log-sum-exp prediction of log L and log L, L-BFGS from a grid of starts.
- :func:`speedup`: tokens the baseline needs to reach its final smoothed loss / tokens the variant needs.
- :func:`equivalent_size`: the baseline size whose L(N) fit matches a variant's loss.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

CI_LEVEL = 0.95


@dataclass
class FitResult:
    law: str
    estimates: dict[str, float]
    ci: dict[str, tuple[float, float]]
    n_points: int
    bootstrap: int
    notes: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci"] = {k: list(v) for k, v in self.ci.items()}
        d["ci_level"] = CI_LEVEL
        return d


def _percentile_ci(samples: np.ndarray) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if samples.size < 2:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(samples, [50 * (1 - CI_LEVEL), 100 - 50 * (1 - CI_LEVEL)])
    return (float(lo), float(hi))


# ----------------------------------------------------------------------------------------------
# Log-linear law in the input vocabulary


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


def complete_groups(x: np.ndarray, groups: np.ndarray) -> list:
    """The groups (seeds) that have a point at every x any group has, in order of first appearance."""
    x, groups = np.asarray(x), np.asarray(groups)
    every = set(x.tolist())
    return [v for v in dict.fromkeys(groups.tolist()) if set(x[groups == v].tolist()) == every]


def fit_loglinear(vocab: np.ndarray, loss: np.ndarray, bootstrap: int = 1000, seed: int = 0,
                  groups: np.ndarray | None = None) -> FitResult:
    """L = intercept + slope * log10(vocab), with 95% intervals.

    ``groups`` (each point's training seed) makes the seed the unit of repetition: a seed's runs share its batches
    and initialisation. Only complete seeds count, those with a point at every vocabulary size any seed has (a
    seed run at some sizes only would tilt the fit toward its offset); the others are named in
    ``notes["left_out"]``. With two or more complete seeds the intervals are Student-t intervals over the per-seed
    fits (``notes["per_seed"]``), and a bootstrap that resamples whole seeds is reported beside them
    (``notes["seed_bootstrap"]``): with 2-3 seeds a bootstrap has only 3-10 distinct resamples and its percentile
    interval is narrower than the seeds' spread warrants, so verdicts use the t intervals. With one complete seed
    (or no groups, or no complete seed: then every point is fitted) the bootstrap resamples the points, an
    interval that holds no seed-to-seed variation, and with points at two sizes only there is no interval (NaN);
    ``notes["seeds"]`` is the number of complete seeds behind the intervals (1 in those cases)."""
    x, y = np.log10(np.asarray(vocab, float)), np.asarray(loss, float)
    notes: dict[str, object] = {}
    complete: list = []
    units: list[np.ndarray] = []
    if groups is not None:
        g = np.asarray(groups)
        every = set(x.tolist())
        members = {v: np.flatnonzero(g == v) for v in dict.fromkeys(g.tolist())}
        complete = complete_groups(x, g)
        left = [f"seed {v} ({len(set(x[idx].tolist()))} of {len(every)} sizes)" for v, idx in members.items()
                if v not in complete]
        if not complete:  # no seed has every size: every point counts, as one seed's would
            notes["no_complete_seed"] = left
        elif left:
            notes["left_out"] = left
        if complete:
            keep = np.concatenate([members[v] for v in complete])
            x, y = x[keep], y[keep]
            members = {v: np.flatnonzero(g[keep] == v) for v in complete}
            if len(complete) >= 2:
                units = list(members.values())
    units = units or [np.array([i]) for i in range(len(x))]
    a, b = _ols(x, y)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(bootstrap):
        idx = np.concatenate([units[i] for i in rng.integers(0, len(units), len(units))])
        if np.ptp(x[idx]) > 0:
            boots.append(_ols(x[idx], y[idx]))
    boots = np.array(boots).reshape(-1, 2)
    boot_ci = {"intercept": _percentile_ci(boots[:, 0]), "slope": _percentile_ci(boots[:, 1])}
    if len(complete) >= 2:
        from scipy import stats

        per_seed = np.array([_ols(x[idx], y[idx]) for idx in units])
        k = len(per_seed)
        half = stats.t.ppf(0.5 + CI_LEVEL / 2, k - 1) * per_seed.std(axis=0, ddof=1) / np.sqrt(k)
        ci = {name: (float(mid - h), float(mid + h))
              for name, mid, h in zip(("intercept", "slope"), per_seed.mean(axis=0), half)}
        notes.update(per_seed={str(v): {"intercept": float(i), "slope": float(s)}
                               for v, (i, s) in zip(complete, per_seed)},
                     seed_bootstrap={k_: list(v) for k_, v in boot_ci.items()},
                     interval=f"Student t over {k} seeds' fits")
    elif len(set(x.tolist())) < 3:  # a line through two sizes fits them exactly: resampling points moves nothing
        ci = {"intercept": (float("nan"), float("nan")), "slope": (float("nan"), float("nan"))}
        notes["interval"] = "none: one seed at two sizes (a line through two points has no spread to resample)"
    else:
        ci = boot_ci
        notes["interval"] = "bootstrap over points"
    resid = y - (a + b * x)
    notes.update(rmse=float(np.sqrt(np.mean(resid**2))), x="log10(vocab)", seeds=max(len(complete), 1))
    return FitResult("loglinear", {"intercept": a, "slope": b}, ci, len(x), bootstrap, notes)


PAPER_LOGLINEAR_SLOPE = -0.0256  # paper Fig. 5: training loss per log10 m, OLMoE-1.3B


def local_slopes(x, y, groups) -> dict:
    """Where a log-linear curve bends: between each pair of adjacent x values, the slope per decade of x, seed by
    seed (``groups``; a seed counts where it has both points), with its mean and 95% Student t interval over the
    seeds (``mean_ci``). ``flat_from``: the smallest x from which no later step's interval lies below 0 (the loss
    stops falling measurably there), None where the last step still falls or fewer than 2 seeds have it."""
    points: dict = {}  # seed -> x -> the losses there
    for xi, yi, gi in zip(np.asarray(x, float), np.asarray(y, float), np.asarray(groups)):
        points.setdefault(gi, {}).setdefault(xi, []).append(yi)
    xs = sorted({xi for per in points.values() for xi in per})
    steps = []
    for a, b in zip(xs, xs[1:]):
        per = {str(g): float((np.mean(p[b]) - np.mean(p[a])) / (np.log10(b) - np.log10(a)))
               for g, p in sorted(points.items()) if a in p and b in p}
        summary = mean_ci(list(per.values()))
        steps.append({"from": float(a), "to": float(b), "slope": summary["mean"], "ci": summary["ci"],
                      "seeds": summary["n"], "per_seed": per})
    flat_from = None
    for i in range(len(steps) - 1, -1, -1):  # from the top of the grid down, while no step falls measurably
        st = steps[i]
        if st["seeds"] < 2 or not st["ci"][1] >= 0:
            break
        flat_from = st["from"]
    return {"steps": steps, "flat_from": flat_from}


def loglinear_verdict(ci: tuple[float, float], seeds: int, paper: float = PAPER_LOGLINEAR_SLOPE) -> str:
    """The verdict a slope's 95% interval supports: reproduced (below 0 and holding the paper's slope); the sign
    reproduced but not the magnitude (below 0, excluding the paper's slope: shallower or steeper); not reproduced
    (above 0, or holding 0 while excluding the paper's slope); not testable (holding both); no verdict from one
    seed."""
    lo, hi = ci
    if seeds < 2:
        return "no verdict: one seed with every size (a claim needs two or more)"
    if hi < 0:
        if lo <= paper <= hi:
            return f"reproduced: the slope's interval lies below 0 and holds the paper's {paper}"
        side = "shallower" if lo > paper else "steeper"
        return (f"sign reproduced, magnitude not: the slope's interval lies below 0 and is {side} than the "
                f"paper's {paper}")
    if lo > 0:
        return "not reproduced: the slope's interval lies above 0"
    if not lo <= paper <= hi:
        return f"not reproduced: the slope's interval holds 0 and excludes the paper's {paper}"
    return f"not testable at this budget: the slope's interval holds both 0 and the paper's {paper}"


# ----------------------------------------------------------------------------------------------
# Chinchilla L(N, D)

HUBER_DELTA = 1e-3


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    a = np.abs(r)
    quad = a <= delta
    loss = np.where(quad, 0.5 * r**2, delta * (a - 0.5 * delta))
    grad = np.where(quad, r, delta * np.sign(r))
    return loss, grad


def _chinchilla_objective(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray):
    """Sum of Huber losses of LSE(a - alpha logN, b - beta logD, e) - log L, with its gradient."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])  # (3, n)
    lse = logsumexp(terms, axis=0)
    w = np.exp(terms - lse)  # softmax weights, d lse / d term
    loss, g = _huber(lse - logL, HUBER_DELTA)
    grad = np.array([np.sum(g * w[0]), np.sum(g * w[1]), np.sum(g * w[2]),
                     np.sum(g * w[0] * -logN), np.sum(g * w[1] * -logD)])
    return float(loss.sum()), grad


def _grid_objective(starts: np.ndarray, logN, logD, logL) -> np.ndarray:
    """Objective at many starts at once: (S, 5) -> (S,)."""
    a, b, e, alpha, beta = (starts[:, i : i + 1] for i in range(5))
    terms = np.stack([a - alpha * logN, b - beta * logD, np.broadcast_to(e, (len(starts), len(logN)))])
    r = logsumexp(terms, axis=0) - logL
    return _huber(r, HUBER_DELTA)[0].sum(1)


def default_start_grid() -> np.ndarray:
    """Hoffmann et al.'s grid, 4,500 starts: a, b in {0, 5, ..., 25}, e in {-1, -.5, ..., 1}, alpha, beta in {0, .5, ..., 2}."""
    axes = [np.arange(0, 30, 5), np.arange(0, 30, 5), np.arange(-1, 1.5, 0.5), np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5)]
    return np.array(list(itertools.product(*axes)), float)


def _fit_once(logN, logD, logL, starts: np.ndarray, n_local: int) -> np.ndarray:
    """Rank every start by the objective (vectorised), then run L-BFGS from the n_local best; keep the best."""
    vals = _grid_objective(starts, logN, logD, logL)
    best_theta, best_val = None, np.inf
    for i in np.argsort(vals)[:n_local]:
        res = minimize(_chinchilla_objective, starts[i], args=(logN, logD, logL), jac=True, method="L-BFGS-B",
                       options={"maxiter": 1000, "ftol": 1e-14, "gtol": 1e-10})
        if res.fun < best_val:
            best_theta, best_val = res.x, res.fun
    return best_theta


def fit_chinchilla(N, D, loss, bootstrap: int = 100, seed: int = 0, starts: np.ndarray | None = None,
                   n_local: int = 64, progress=None) -> FitResult:
    """Fit L = E + A N^-alpha + B D^-beta; estimates E, A, B, alpha, beta with bootstrap CIs. ``progress(done,
    total)`` is called after the full fit (done 0) and after each bootstrap resample."""
    logN, logD, logL = np.log(np.asarray(N, float)), np.log(np.asarray(D, float)), np.log(np.asarray(loss, float))
    starts = default_start_grid() if starts is None else starts
    theta = _fit_once(logN, logD, logL, starts, n_local)
    if progress:
        progress(0, bootstrap)
    rng = np.random.default_rng(seed)
    boots = []
    # resamples start from the full-data optimum and the 32 grid points best on the full data (the optimum rarely
    # moves far; ranking all starts again for every resample cost as much as the local runs)
    local = np.vstack([theta, starts[np.argsort(_grid_objective(starts, logN, logD, logL))[:32]]])
    for i in range(bootstrap):
        idx = rng.integers(0, len(logN), len(logN))
        boots.append(_fit_once(logN[idx], logD[idx], logL[idx], local, n_local=2))
        if progress:
            progress(i + 1, bootstrap)
    boots = np.array(boots).reshape(-1, 5)

    def natural(t):
        return {"E": np.exp(t[..., 2]), "A": np.exp(t[..., 0]), "B": np.exp(t[..., 1]), "alpha": t[..., 3], "beta": t[..., 4]}

    est = {k: float(v) for k, v in natural(theta).items()}
    nb = natural(boots) if len(boots) else {k: np.array([]) for k in est}
    return FitResult("chinchilla", est, {k: _percentile_ci(np.asarray(nb[k])) for k in est}, len(logN), bootstrap,
                     {"objective": "sum of Huber(delta=1e-3) on log L", "starts": len(starts), "local_runs": n_local})


def formula(law: str, est: dict[str, float]) -> str:
    """The fitted law as one line of text."""
    if law == "chinchilla":
        return (f"L(N, D) = {est['E']:.4g} + {est['A']:.4g} / N^{est['alpha']:.4g} + "
                f"{est['B']:.4g} / D^{est['beta']:.4g}")
    sign = "-" if est["slope"] < 0 else "+"
    return f"L = {est['intercept']:.4g} {sign} {abs(est['slope']):.4g} log10(vocab)"


def chinchilla_predict(est: dict[str, float], N, D) -> np.ndarray:
    return est["E"] + est["A"] / np.asarray(N, float) ** est["alpha"] + est["B"] / np.asarray(D, float) ** est["beta"]


# ----------------------------------------------------------------------------------------------
# Speedups


def ema(values: np.ndarray, alpha: float = 0.1) -> np.ndarray:
    """Exponential moving average (bias-corrected), for noisy training curves."""
    out = np.empty(len(values))
    m, w = 0.0, 0.0
    for i, v in enumerate(values):
        m = (1 - alpha) * m + alpha * v
        w = (1 - alpha) * w + alpha
        out[i] = m / w
    return out


def tokens_to_reach(steps: np.ndarray, values: np.ndarray, target: float, higher_is_better: bool = False) -> float:
    """First (linearly interpolated) token count where the curve reaches target; nan if it never does."""
    steps, values = np.asarray(steps, float), np.asarray(values, float)
    reached = values >= target if higher_is_better else values <= target
    if not reached.any():
        return float("nan")
    i = int(np.argmax(reached))
    if i == 0:
        return float(steps[0])
    x0, x1, y0, y1 = steps[i - 1], steps[i], values[i - 1], values[i]
    return float(x0 + (target - y0) * (x1 - x0) / (y1 - y0)) if y1 != y0 else float(x1)


def speedup(base_steps, base_values, var_steps, var_values, smooth: float | None = 0.1,
            higher_is_better: bool = False) -> dict[str, float]:
    """Tokens the baseline needs to reach its final (smoothed) value / tokens the variant needs to reach it."""
    bv = ema(np.asarray(base_values, float), smooth) if smooth else np.asarray(base_values, float)
    vv = ema(np.asarray(var_values, float), smooth) if smooth else np.asarray(var_values, float)
    target = float(bv[-1])
    t_base = tokens_to_reach(base_steps, bv, target, higher_is_better)
    t_var = tokens_to_reach(var_steps, vv, target, higher_is_better)
    return {"target": target, "tokens_baseline": t_base, "tokens_variant": t_var, "speedup": t_base / t_var}


def mean_ci(values: list[float]) -> dict[str, object]:
    """Mean over seeds with its 95% Student t interval (nan bounds with a single seed): with the 2-3 seeds of a
    typical sweep a bootstrap of the mean has a handful of distinct resamples and understates the spread."""
    from scipy import stats

    v = np.array([x for x in values if np.isfinite(x)], float)
    if v.size == 0:
        return {"mean": float("nan"), "ci": [float("nan"), float("nan")], "n": 0}
    if v.size == 1:
        return {"mean": float(v[0]), "ci": [float("nan"), float("nan")], "n": 1}
    half = stats.t.ppf(0.5 + CI_LEVEL / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
    return {"mean": float(v.mean()), "ci": [float(v.mean() - half), float(v.mean() + half)], "n": int(v.size)}


def speedup_verdict(summary: dict, seeds: int) -> str:
    """The verdict on the paper's claim that a variant reaches the baseline's loss in fewer tokens: reproduced (the
    speedup's interval lies above 1), not reproduced (below 1, or a seed never reaches the baseline's final loss),
    not testable at this budget (the interval holds 1); no verdict from one seed."""
    missed = seeds - int(summary.get("n") or 0)
    if seeds < 2:
        return "no verdict: one seed (a claim needs two or more)" + (
            "; it never reaches the baseline's final loss" if missed else "")
    if missed:
        return f"not reproduced: {missed} of {seeds} seeds never reach the baseline's final loss"
    lo, hi = summary["ci"]
    if lo > 1:
        return "reproduced: the speedup's interval lies above 1"
    if hi < 1:
        return "not reproduced: the speedup's interval lies below 1"
    return "not testable at this budget: the speedup's interval holds 1"


def wilson_ci(successes: int, trials: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a binomial proportion (sensible at 0 or a few successes, unlike p +- z se)."""
    if trials <= 0:
        return [float("nan"), float("nan")]
    p = successes / trials
    centre = p + z * z / (2 * trials)
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    denom = 1 + z * z / trials
    return [float(max((centre - half) / denom, 0.0)), float(min((centre + half) / denom, 1.0))]


def difference_ci(k1: int, n1: int, k2: int, n2: int) -> list[float]:
    """95% interval of p1 - p2 for two independent proportions, Newcombe's hybrid score interval built from the
    two Wilson intervals (keeps its coverage at accuracies near 0 or 1, where p +- z se does not)."""
    p1, p2 = k1 / n1, k2 / n2
    (l1, u1), (l2, u2) = wilson_ci(k1, n1), wilson_ci(k2, n2)
    d = p1 - p2
    return [float(d - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)), float(d + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))]


def direction_verdict(ci: list[float], expected: int, seeds: int) -> str:
    """The verdict an interval of (variant - baseline) supports for the paper's direction (+1: the variant is
    better, -1: worse): reproduced (the interval lies on that side of 0), not reproduced (on the other side), not
    testable at this budget (it holds 0); no verdict from one seed."""
    lo, hi = ci
    said = "helps" if expected > 0 else "hurts"
    if seeds < 2:
        return f"no verdict: one seed (a claim needs two or more); the paper: {said}"
    if (lo > 0 and expected > 0) or (hi < 0 and expected < 0):
        return f"reproduced: {said}, as the paper"
    if lo > 0 or hi < 0:
        return f"not reproduced: the paper says it {said}, the interval lies on the other side of 0"
    return f"not testable at this budget: the interval holds 0 (the paper: {said})"


# ----------------------------------------------------------------------------------------------
# Equivalent baseline size


def equivalent_size(base_N, base_loss, loss) -> dict[str, object]:
    """The baseline size N whose loss equals ``loss``: from L(N) = E + A N^-alpha with >= 3 sizes, else from a
    line in log N through 2 sizes (an extrapolation beyond the largest baseline is flagged)."""
    N, L = np.asarray(base_N, float), np.asarray(base_loss, float)
    order = np.argsort(N)
    N, L = N[order], L[order]
    if len(N) >= 3:
        def obj(t):
            E, logA, alpha = t
            return float(np.sum((E + np.exp(logA) * N**-alpha - L) ** 2))

        best = min((minimize(obj, [e0, np.log(max(L[0] - e0, 1e-3)) + a0 * np.log(N[0]), a0], method="Nelder-Mead",
                             options={"maxiter": 5000, "xatol": 1e-10, "fatol": 1e-14})
                    for e0 in (0.0, 0.5 * L.min(), 0.9 * L.min()) for a0 in (0.1, 0.3, 0.7)), key=lambda r: r.fun)
        E, logA, alpha = best.x
        n_eq = (np.exp(logA) / (loss - E)) ** (1 / alpha) if loss > E else float("inf")
        method = "L(N) = E + A N^-alpha"
    elif len(N) == 2:
        slope = (L[1] - L[0]) / (np.log(N[1]) - np.log(N[0]))
        n_eq = float(np.exp(np.log(N[0]) + (loss - L[0]) / slope)) if slope != 0 else float("nan")
        method = "linear in log N through 2 baselines"
    else:
        return {"N_equivalent": float("nan"), "method": "needs >= 2 baseline sizes"}
    return {"N_equivalent": float(n_eq), "method": method, "extrapolated": bool(n_eq > N.max() or n_eq < N.min())}

"""Is a difference between configurations real? Confidence intervals over seeds and non-parametric
tests over paired (class, seed) cells, as `python -m freqexp.report --significance` uses them.

- `t_interval`: the 95 % Student-t interval of a mean over seeds (scipy.stats.t).
- two configurations: `paired_wilcoxon`, the Wilcoxon signed-rank test over the cells both have
  (scipy.stats.wilcoxon);
- three or more: `friedman_nemenyi`, the Friedman test over the cells all have
  (scipy.stats.friedmanchisquare), then the Nemenyi post-hoc test and the critical difference of
  Demšar (2006) (scikit-posthocs), drawn by `cd_diagram`.

The statistics are the libraries'; this module only pairs the cells, ranks the configurations and
writes the results (significance.md/.csv, cd_diagram.png). See docs/statistics.md."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import pandas as pd

CONFIDENCE = 0.95  # of the intervals over seeds
ALPHA = 0.05       # of the tests and the critical difference diagram
UNIT = "(class, seed) cells"  # the blocks a paired test pairs over
# metrics where smaller is better (losses, time, memory); every other metric: larger is better
LOWER_IS_BETTER_WORDS = ("loss", "seconds", "memory", "error", "_mb", "_gb")


class StatsError(ValueError):
    """The data cannot give the test asked for; the message names the option and what is missing."""


def lower_is_better(metric: str) -> bool:
    name = metric.rsplit("/", 1)[-1].lower()
    return any(w in name for w in LOWER_IS_BETTER_WORDS)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(low, high) of the Student-t confidence interval of the mean: mean ± t_{(1+c)/2, n-1}·s/√n,
    s the sample standard deviation (ddof=1). NaNs are left out; fewer than 2 values give no
    interval: (nan, nan)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    if n < 2:
        return (math.nan, math.nan)
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return (mean - half, mean + half)


@dataclass
class WilcoxonResult:
    a: str
    b: str
    n: int               # pairs: (class, seed) cells both configurations have
    statistic: float     # scipy's: the smaller of the signed-rank sums (two-sided)
    pvalue: float
    median_diff: float   # median over pairs of a - b
    mean_a: float
    mean_b: float
    n_zero: int = 0      # pairs with a == b (left out by the test, zero_method="wilcox")
    unit: str = UNIT     # what a pair is
    n_unpaired: int = 0  # cells only one of the two has (left out)


@dataclass
class FriedmanResult:
    n_blocks: int                 # (class, seed) cells every configuration has
    statistic: float
    pvalue: float
    avg_ranks: pd.Series          # rank 1 = best, sorted best first
    means: pd.Series              # mean of the metric over the blocks used, same order
    pvalues: pd.DataFrame         # Nemenyi pairwise p-values, rows/columns in avg_ranks order
    cd: float                     # Demšar's critical difference at ALPHA
    alpha: float = ALPHA
    notes: List[str] = field(default_factory=list)
    unit: str = UNIT              # what a block is


def paired_wilcoxon(a: pd.Series, b: pd.Series, name_a: str = "a", name_b: str = "b", unit: str = UNIT) -> WilcoxonResult:
    """Two-sided Wilcoxon signed-rank test of a - b over the index labels (blocks) both series
    have a value for. Raises StatsError with fewer than 2 shared blocks."""
    from scipy import stats

    both = pd.concat({"a": a, "b": b}, axis=1)
    pair = both.dropna()
    unpaired = int(both.notna().any(axis=1).sum()) - len(pair)
    if len(pair) < 2:
        raise StatsError(f"--significance: {name_a!r} and {name_b!r} share {len(pair)} of the {unit}; "
                         "a paired test needs at least 2")
    d = pair["a"].to_numpy(float) - pair["b"].to_numpy(float)
    n_zero = int((d == 0).sum())
    if n_zero == len(d):
        stat, p = 0.0, 1.0  # identical on every cell: nothing to test (scipy divides by zero here)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = stats.wilcoxon(pair["a"].to_numpy(float), pair["b"].to_numpy(float))
        stat, p = float(res.statistic), float(res.pvalue)
    return WilcoxonResult(name_a, name_b, len(pair), stat, p, float(np.median(d)), float(pair["a"].mean()),
                          float(pair["b"].mean()), n_zero, unit, unpaired)


def critical_difference(k: int, n_blocks: int, alpha: float = ALPHA) -> float:
    """Demšar (2006), eq. for the Nemenyi test: CD = q_α·sqrt(k(k+1)/(6N)), q_α the studentized
    range quantile (k groups, infinite df) divided by √2."""
    from scipy.stats import studentized_range

    q = float(studentized_range.ppf(1 - alpha, k, np.inf)) / math.sqrt(2)
    return q * math.sqrt(k * (k + 1) / (6 * n_blocks))


def friedman_nemenyi(table: pd.DataFrame, higher_is_better: bool = True, alpha: float = ALPHA,
                     unit: str = UNIT) -> FriedmanResult:
    """Friedman test over a blocks x configurations table (rows with any NaN left out), then the
    Nemenyi post-hoc p-values (scikit-posthocs) and average ranks (1 = best). Raises StatsError
    with fewer than 3 configurations or 2 complete blocks."""
    from scipy import stats
    import scikit_posthocs as sp

    k = table.shape[1]
    if k < 3:
        raise StatsError(f"--significance: the Friedman test needs at least 3 configurations; found {k}")
    full = table.dropna(how="any")
    if len(full) < 2:
        raise StatsError(f"--significance: the {k} configurations have {len(full)} of the {unit} in common; "
                         "the Friedman test needs at least 2")
    values = full.to_numpy(float)
    notes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.friedmanchisquare(*values.T)
    stat, p = float(res.statistic), float(res.pvalue)
    if not np.isfinite(stat):
        notes.append("every block ties all configurations: the Friedman statistic is undefined")
    ranks = pd.DataFrame(stats.rankdata(-values if higher_is_better else values, axis=1),
                         index=full.index, columns=full.columns)
    avg = ranks.mean().sort_values(kind="stable")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pv = sp.posthoc_nemenyi_friedman(full.reset_index(drop=True))
    pv = pv.loc[avg.index, avg.index]
    means = full.mean().loc[avg.index]
    if len(full) < len(table):
        notes.append(f"{len(table) - len(full)} of the {len(table)} {unit} left out: "
                     "not every configuration has them")
    return FriedmanResult(len(full), stat, p, avg, means, pv, critical_difference(k, len(full), alpha), alpha, notes,
                          unit)


def cd_diagram(result: FriedmanResult, path: Path, title: str = "") -> Path:
    """Critical difference diagram (Demšar 2006) by scikit-posthocs: configurations on the
    average-rank axis, bars join those the Nemenyi test cannot tell apart at alpha."""
    import scikit_posthocs as sp

    from freqexp.plots import plt, save_figure

    k = len(result.avg_ranks)
    fig, ax = plt.subplots(figsize=(7.5, 1.4 + 0.32 * k))
    sp.critical_difference_diagram(result.avg_ranks, result.pvalues, ax=ax, alpha=result.alpha,
                                   label_fmt_left="{label} ({rank:.2f})", label_fmt_right="({rank:.2f}) {label}")
    title = title or f"average rank over {result.n_blocks} blocks (1 = best)"
    ax.set_title(f"{title}\nbars: not different (Nemenyi, α = {result.alpha}); CD = {result.cd:.2f}", fontsize=9, pad=12)
    return save_figure(fig, path)


def _fmt_p(p: float) -> str:
    if p != p:
        return "n/a"
    return f"{p:.2e}" if p < 1e-4 else f"{p:.4f}"


def wilcoxon_markdown(r: WilcoxonResult, metric: str) -> str:
    verdict = ("differ" if r.pvalue < ALPHA else "cannot be told apart") + f" at α = {ALPHA}"
    lines = [f"# Significance: {metric}", "",
             f"Two configurations, paired over the {r.unit} both have: Wilcoxon signed-rank test "
             f"(two-sided, scipy.stats.wilcoxon).", "",
             "| configuration | mean over pairs |", "|---|---:|",
             f"| {_md(r.a)} | {r.mean_a:.4f} |", f"| {_md(r.b)} | {r.mean_b:.4f} |", "",
             f"| pairs | statistic | p-value | median difference ({_md(r.a)} − {_md(r.b)}) |", "|---:|---:|---:|---:|",
             f"| {r.n} | {r.statistic:g} | {_fmt_p(r.pvalue)} | {r.median_diff:+.4f} |", "",
             f"The two {verdict}."]
    if r.n_unpaired:
        lines.append(f"Left out: {r.n_unpaired} of the {r.unit} that only one of the two has.")
    if r.n_zero:
        lines.append(f"{r.n_zero} pair(s) with equal values are left out of the test (zero_method='wilcox').")
    if r.n < 6:
        lines.append(f"With {r.n} pairs the two-sided p-value cannot fall below 0.05: add seeds or classes.")
    return "\n".join(lines) + "\n"


def wilcoxon_frame(r: WilcoxonResult, metric: str) -> pd.DataFrame:
    return pd.DataFrame([{"test": "wilcoxon", "metric": metric, "configuration_a": r.a, "configuration_b": r.b,
                          "n_pairs": r.n, "statistic": r.statistic, "pvalue": r.pvalue, "median_diff": r.median_diff,
                          "mean_a": r.mean_a, "mean_b": r.mean_b}])


def friedman_markdown(r: FriedmanResult, metric: str, diagram: Optional[str] = None) -> str:
    names = list(r.avg_ranks.index)
    if r.pvalue == r.pvalue:
        verdict = (f"p < {r.alpha}: the configurations do not all perform alike; the Nemenyi p-values below say "
                   "which pairs differ." if r.pvalue < r.alpha else
                   f"p ≥ {r.alpha}: no evidence that the configurations differ; the Nemenyi p-values are shown for "
                   "completeness, and no pair should be called different.")
    else:
        verdict = "The Friedman statistic is undefined."
    lines = [f"# Significance: {metric}", "",
             f"{len(names)} configurations, blocks = the {r.n_blocks} {r.unit} all of them have. "
             "Friedman test (scipy.stats.friedmanchisquare), then the Nemenyi post-hoc test "
             "(scikit_posthocs.posthoc_nemenyi_friedman), Demšar (2006).", "",
             f"Friedman χ² = {r.statistic:.4f}, p = {_fmt_p(r.pvalue)} ({len(names) - 1} degrees of freedom). {verdict}",
             "", f"Critical difference (Nemenyi, α = {r.alpha}): CD = {r.cd:.3f}: average ranks further apart than "
             "this differ.", "",
             "| configuration | average rank (1 = best) | mean |", "|---|---:|---:|"]
    lines += [f"| {_md(n)} | {r.avg_ranks[n]:.3f} | {r.means[n]:.4f} |" for n in names]
    lines += ["", "Nemenyi p-values (pairwise):", "",
              "| | " + " | ".join(_md(n) for n in names) + " |", "|---|" + "---:|" * len(names)]
    for a in names:
        cells = ["—" if a == b else (f"**{_fmt_p(r.pvalues.loc[a, b])}**" if r.pvalues.loc[a, b] < r.alpha
                                     else _fmt_p(r.pvalues.loc[a, b])) for b in names]
        lines.append(f"| {_md(a)} | " + " | ".join(cells) + " |")
    lines += ["", f"Bold: p < {r.alpha}."]
    lines += r.notes
    if diagram:
        lines += ["", f"![critical difference diagram]({diagram})"]
    return "\n".join(lines) + "\n"


def friedman_frame(r: FriedmanResult, metric: str) -> pd.DataFrame:
    """One row per configuration (best first): average rank, mean, the Friedman test (same on
    every row) and the Nemenyi p-value against each configuration (columns `p vs <name>`)."""
    rows = []
    for n in r.avg_ranks.index:
        row = {"test": "friedman+nemenyi", "metric": metric, "configuration": n, "avg_rank": r.avg_ranks[n],
               "mean": r.means[n], "n_blocks": r.n_blocks, "friedman_statistic": r.statistic,
               "friedman_pvalue": r.pvalue, "cd": r.cd}
        row.update({f"p vs {m}": r.pvalues.loc[n, m] for m in r.avg_ranks.index})
        rows.append(row)
    return pd.DataFrame(rows)


def block_table(cells: pd.DataFrame) -> pd.DataFrame:
    """cells (columns configuration, block, value) as a blocks x configurations table."""
    table = cells.pivot_table(index="block", columns="configuration", values="value", aggfunc="mean")
    return table.reindex(columns=sorted(table.columns, key=str))


def significance(cells: pd.DataFrame, metric: str, unit: str = UNIT):
    """cells: columns configuration, block, value. Two configurations: a WilcoxonResult; three
    or more: a FriedmanResult. Raises StatsError (fewer than 2 configurations, too few shared
    cells) before anything is written."""
    table = block_table(cells)
    k = table.shape[1]
    if k < 2:
        raise StatsError(f"--significance needs at least 2 configurations to compare; found {k}")
    if k == 2:
        a, b = table.columns
        return paired_wilcoxon(table[a], table[b], str(a), str(b), unit)
    return friedman_nemenyi(table, higher_is_better=not lower_is_better(metric), unit=unit)


def write_significance(result, metric: str, out: Path) -> tuple[List[Path], str]:
    """significance.md/.csv (and cd_diagram.png for 3+ configurations) under out; returns
    (files, markdown)."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "significance.md", out / "significance.csv"]
    if isinstance(result, WilcoxonResult):
        text = wilcoxon_markdown(result, metric)
        wilcoxon_frame(result, metric).to_csv(files[1], index=False)
    else:
        files.append(cd_diagram(result, out / "cd_diagram.png",
                                title=f"{metric}: average rank over {result.n_blocks} {result.unit} (1 = best)"))
        text = friedman_markdown(result, metric, diagram="cd_diagram.png")
        friedman_frame(result, metric).to_csv(files[1], index=False)
    files[0].write_text(text)
    return files, text


def compare(cells: pd.DataFrame, metric: str, out: Path) -> tuple[List[Path], str]:
    """significance, then write_significance."""
    return write_significance(significance(cells, metric), metric, out)


def _md(s) -> str:
    return str(s).replace("|", "\\|")

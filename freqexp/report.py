"""Leaderboards from MLflow: `python -m freqexp.report [options] [key=value ...]`.

Reads finished runs (pandas via mlflow.search_runs; runs tagged pruned are left out unless
--include-pruned), groups them by the config keys that vary among them (the swept keys; never
the seed or a run-control key such as sweep.*, tracking.*, hardware.*, resolved.precision:
freqexp.tracking.RUN_CONTROL), counts each seed once (a seed run twice keeps its latest run and
is flagged in dup_seeds), and writes leaderboard.csv/.md (mean, std, 95 % Student-t interval
and n over seeds), heatmaps (model x loss, model x filter) and a short summary. Rows are sorted
by val/auroc, the objective sweeps optimize; test metrics are shown beside it, never used to rank.

Where a class key varies (dataset.normal_class, dataset.category or dataset.domain), also
pivot.md/.tex/.csv: methods x classes, each cell the mean over seeds of --metric. With
--significance, significance.md/.csv (Wilcoxon for 2 configurations; Friedman + Nemenyi and
cd_diagram.png for 3 or more), over the paired (class, seed) cells. See docs/statistics.md."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import pandas as pd

from freqexp.errors import ReportError
from freqexp.stats import CONFIDENCE, StatsError, lower_is_better, t_interval
from freqexp.tracking import REPLICATE, RUN_CONTROL, defines_experiment, existing_store

METRICS = ["val/auroc", "val/ap", "test/auroc", "test/ap", "test/f1", "test/balanced_acc", "test/pixel_auroc",
           "train/throughput", "test/throughput"]
# params that never split a configuration: the seed and the run-control keys (freqexp.tracking's
# one rule, shared with resume's config hash), as exact keys and as prefixes (for freqexp.benchmark)
NOT_SWEPT = {REPLICATE, *RUN_CONTROL}
NOT_SWEPT_PREFIX = tuple(f"{key}." for key in RUN_CONTROL)
# the key that names the class / category / domain a run trained on, per dataset
CLASS_KEYS = ("dataset.normal_class", "dataset.category", "dataset.domain")
DEFAULT_METRIC = "test/auroc"  # of the pivot and of --significance
NOT_PRUNED = {"", "false", "0", "no", "nan", "none"}
MAX_WARNINGS = 20  # repeated-seed lines printed; the rest are counted


def pruned_mask(df: pd.DataFrame) -> pd.Series:
    """True for runs tagged pruned (tag `pruned` set to anything but false/0/no): FINISHED runs
    tagged pruned=true and KILLED runs a pruner stopped."""
    if "tags.pruned" not in df.columns:
        return pd.Series(False, index=df.index)
    return ~df["tags.pruned"].fillna("").astype(str).str.strip().str.lower().isin(NOT_PRUNED)


RUN_KEYS = {"tracking.uri": "uri", "tracking.experiment": "experiment", "sweep_id": "sweep_id"}


def split_run_keys(args) -> None:
    """`tracking.uri=...` and `tracking.experiment=...` as a run takes them: the same words work
    for `python -m freqexp` and for its report (they are not config filters)."""
    rest = []
    for item in args.filters:
        key, sep, value = item.partition("=")
        if sep and key.lstrip("+") in RUN_KEYS:
            setattr(args, RUN_KEYS[key.lstrip("+")], value)
        else:
            rest.append(item)
    args.filters = rest


def load_runs(uri: str, experiment: Optional[str], sweep_id: Optional[str], filters: Sequence[str],
              include_pruned: bool = False) -> pd.DataFrame:
    """FINISHED runs, less those tagged pruned; with include_pruned, those and the KILLED runs
    tagged pruned too."""
    import mlflow

    from freqexp.tracking import first_sentence

    uri = existing_store(uri)
    mlflow.set_tracking_uri(uri)
    try:  # the first request: a file that is not a store, a database that refuses us
        known = sorted(e.name for e in mlflow.search_experiments())
    except Exception as e:  # noqa: BLE001 - MlflowException, SQLAlchemy and HTTP errors alike
        raise ReportError(f"tracking.uri: {uri}: the store cannot be read ({first_sentence(e)})") from None
    try:  # runs left RUNNING by a process killed hard: KILLED, said in one line
        from freqexp.multirun.orphans import reap_store  # points up (multirun): a report reaps killed sweeps' runs first

        reap_store(uri, experiment)
    except Exception:  # noqa: BLE001 - a read-only store still gets its report
        pass
    if experiment and experiment not in known:
        import difflib

        close = difflib.get_close_matches(experiment, known, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ReportError(f"--experiment: no experiment {experiment!r} in {uri}; {hint}experiments: {', '.join(known) or 'none'}")
    clauses = []
    if sweep_id:
        clauses.append(f"tags.sweep_id = '{sweep_id}'")
    for f in filters:
        key, sep, value = f.partition("=")
        if not sep:
            raise ReportError(f"filter {f!r} must be key=value (a config key, e.g. model.name=cae)")
        clauses.append(f"params.`{key}` = '{value}'")
    names = [experiment] if experiment else None

    def search(status: str) -> pd.DataFrame:
        return mlflow.search_runs(experiment_names=names, search_all_experiments=names is None, max_results=100000,
                                  filter_string=" and ".join([f"attributes.status = '{status}'"] + clauses))

    try:
        df = search("FINISHED")
        killed = search("KILLED") if include_pruned else None
    except Exception as e:  # noqa: BLE001 - a filter the search cannot parse
        what = " ".join(list(filters) + ([f"--sweep-id {sweep_id}"] if sweep_id else [])) or uri
        raise ReportError(f"{what}: the store refused the search ({first_sentence(e)})") from None
    if killed is not None:
        killed = killed[pruned_mask(killed)]
        if not killed.empty:
            df = killed if df.empty else pd.concat([df, killed], ignore_index=True)
    else:
        df = df[~pruned_mask(df)]
    if "tags.kind" in df.columns:
        df = df[df["tags.kind"].isna()]  # analyses and reports are not experiments
    return df


def runs_for_table(prog: str, uri: str, experiment: str):
    """The finished runs of one experiment, for a program that writes a table from them:
    (runs, None), or (None, exit code) after one line on stderr (2: a bad store or experiment,
    1: no finished run)."""
    try:
        df = load_runs(uri, experiment, None, [])
    except ReportError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return None, 2
    if df.empty:
        print(f"{prog}: no finished runs in experiment {experiment!r} at {uri}", file=sys.stderr)
        return None, 1
    return df, None


def swept_keys(df: pd.DataFrame) -> List[str]:
    keys = []
    for col in df.columns:
        if not col.startswith("params."):
            continue
        key = col[len("params."):]
        if not defines_experiment(key):
            continue
        if df[col].fillna("∅").nunique() > 1:
            keys.append(key)
    return drop_dependent(df, sorted(keys, key=key_order))


GROUP_ORDER = ["model", "loss", "filter", "augment", "dataset", "optim", "trainer", "score"]


def group_of(key: str) -> str:
    parts = key.split(".")
    return parts[1] if parts[0] == "choice" and len(parts) > 1 else parts[0]


def key_order(key: str):
    group = group_of(key)
    return (GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER), key)


def drop_dependent(df: pd.DataFrame, keys: List[str]) -> List[str]:
    """Leave out options that only follow their group's choice (loss.weights.mse follows
    loss.spec, model.latent_dim follows model.name when each model keeps its default): they add
    columns, not configurations. An option swept on its own (varying within one choice) stays."""
    kept = []
    for k in keys:
        group = group_of(k)
        selector = f"choice.{group}" if f"choice.{group}" in keys else ("loss.spec" if group == "loss" else f"{group}.name")
        if k != selector and selector in keys:
            own = df[f"params.{k}"].fillna("∅").groupby(df[f"params.{selector}"].fillna("∅")).nunique()
            if own.max() == 1:
                continue
        kept.append(k)
    return kept


def natural_key(value):
    """Numbers in numeric order before other strings: classes 2 < 10, seeds likewise."""
    text = str(value)
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def config_label(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "(one configuration)"


@dataclass
class Repeat:
    """A seed run more than once in one configuration; only the latest run is counted."""
    config: str
    seed: str
    runs: int
    kept_run: str

    def warning(self) -> str:
        return (f"freqexp.report: warning: seed {self.seed} of {self.config} has {self.runs} finished runs; "
                f"counted once (the latest, run {self.kept_run})")


def seed_table(df: pd.DataFrame, keys: List[str]) -> tuple[pd.DataFrame, List[Repeat]]:
    """One row per (configuration, seed): the swept keys, every logged metric, `_seed` and
    `_run`, and `_repeated` (the seed ran more than once here). A seed run twice keeps its latest
    run (by start time): a rerun replaces what it reruns. Runs without a seed param are each
    counted as one."""
    work = pd.DataFrame({k: df[f"params.{k}"].fillna("∅") for k in keys}, index=df.index)
    for col in df.columns:
        if col.startswith("metrics."):
            work[col[len("metrics."):]] = pd.to_numeric(df[col], errors="coerce")
    work["_seed"] = df["params.seed"] if "params.seed" in df.columns else pd.Series(None, index=df.index, dtype=object)
    work["_run"] = df["run_id"].astype(str) if "run_id" in df.columns else df.index.astype(str)
    if "tags.protocol" in df.columns:  # unsupervised | semi-supervised (freqexp.data.base.validation_protocol)
        work["_protocol"] = df["tags.protocol"]
    for col in ("start_time", "end_time"):
        work[f"_{col}"] = pd.to_datetime(df[col], utc=True, errors="coerce") if col in df.columns else pd.NaT
    work = work.sort_values(["_start_time", "_end_time"], kind="stable", na_position="first")
    seeded = work["_seed"].notna()
    ident = keys + ["_seed"]
    runs_of_seed = work.groupby(ident, dropna=False)["_run"].transform("size") if len(work) else pd.Series(0, index=work.index)
    work["_repeated"] = seeded & (runs_of_seed > 1)
    keep = ~(seeded & work.duplicated(ident, keep="last"))
    repeats = [Repeat(config_label({k: r[k] for k in keys}), str(r["_seed"]), int(runs_of_seed[i]), r["_run"])
               for i, r in work[keep & work["_repeated"]].iterrows()]
    return work[keep].drop(columns=["_start_time", "_end_time"]), repeats


HARDWARE_PARAMS = ("resolved.accelerator", "resolved.precision")


def mixed_hardware(df: pd.DataFrame, keys: List[str], runs: pd.DataFrame) -> Optional[str]:
    """One note when a configuration counts runs made on different hardware (accelerator and
    precision are run control, so they never split a row), else None. Runs that logged neither
    param (older ones) are left out of the comparison."""
    cols = [f"params.{p}" for p in HARDWARE_PARAMS if f"params.{p}" in df.columns]
    if not cols:
        return None
    kept = df.loc[runs.index, cols].dropna(how="all")
    if kept.empty:
        return None
    hardware = kept.fillna("?").astype(str)
    label = hardware.agg(" ".join, axis=1)
    config = runs.loc[kept.index, keys].astype(str).agg(", ".join, axis=1) if keys else pd.Series("all", index=kept.index)
    kinds = label.groupby(config).nunique()
    mixed = config.isin(kinds[kinds > 1].index)
    if not mixed.any():
        return None
    seen = sorted(set(label[mixed]))
    by = next((c for c in reversed(cols) if hardware.loc[mixed, c].nunique() > 1), cols[0])  # precision, else accelerator
    return (f"freqexp.report: note: {int((kinds > 1).sum())} configuration(s) count runs made on different hardware "
            f"({', '.join(seen)}) as one experiment; to compare them, filter, e.g. {by[len('params.'):]}="
            f"{sorted(hardware.loc[mixed, by].unique())[0]} (docs/sweeps.md)")


def leaderboard(df: pd.DataFrame, keys: List[str], runs: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """One row per configuration: n (seeds, each counted once), then per metric the mean, std
    and the 95 % Student-t interval over seeds (ci_low, ci_high: empty for n < 2), and dup_seeds
    (seeds that ran more than once, comma-separated). Sorted by val/auroc."""
    if runs is None:
        runs, _ = seed_table(df, keys)
    metrics = [m for m in METRICS if f"metrics.{m}" in df.columns]
    grouped = runs.groupby(keys, dropna=False) if keys else runs.groupby(lambda _: "all")
    rows = []
    for name, g in grouped:
        row = dict(zip(keys, name if isinstance(name, tuple) else (name,))) if keys else {}
        row["n"] = len(g)
        for m in metrics:
            row[f"{m} mean"] = g[m].mean()
            row[f"{m} std"] = g[m].std(ddof=1) if len(g) > 1 else 0.0
            row[f"{m} ci_low"], row[f"{m} ci_high"] = t_interval(g[m])
        if "_protocol" in g:
            row["protocol"] = ", ".join(sorted(set(g["_protocol"].dropna().astype(str))))
        row["dup_seeds"] = ",".join(sorted(set(g.loc[g["_repeated"], "_seed"].astype(str)), key=natural_key))
        rows.append(row)
    board = pd.DataFrame(rows)
    if "val/auroc mean" in board:
        board = board.sort_values("val/auroc mean", ascending=False, kind="stable")
    return board.reset_index(drop=True)


def _ci_cell(r, m: str) -> str:
    if pd.isna(r[f"{m} mean"]):
        return ""
    lo, hi = r.get(f"{m} ci_low"), r.get(f"{m} ci_high")
    if lo is None or pd.isna(lo):
        return "none (n=1)"
    return f"[{lo:.4f}, {hi:.4f}]"


def to_markdown(board: pd.DataFrame, keys: List[str]) -> str:
    """`mean ± std` per metric (throughput: the mean), each followed by its 95 % interval over
    seeds; a dup seeds column when a seed ran more than once."""
    metrics = [m for m in METRICS if f"{m} mean" in board.columns]
    with_ci = [m for m in metrics if "throughput" not in m and f"{m} ci_low" in board.columns]
    dups = "dup_seeds" in board.columns and board["dup_seeds"].fillna("").astype(str).str.len().gt(0).any()
    protocols = "protocol" in board.columns and board["protocol"].fillna("").astype(str).str.len().gt(0).any()
    header = ["#"] + keys + (["protocol"] if protocols else []) + ["n"]
    for m in metrics:
        header += [m] + ([f"{m} {CONFIDENCE:.0%} CI"] if m in with_ci else [])
    header += ["dup seeds"] if dups else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, r in board.iterrows():
        cells = [str(i + 1)] + [str(r[k]) for k in keys] + (["" if pd.isna(r["protocol"]) else str(r["protocol"])] if protocols else []) + [str(int(r["n"]))]
        for m in metrics:
            mean, std = r[f"{m} mean"], r[f"{m} std"]
            if pd.isna(mean):
                cells.append("")
            elif "throughput" in m:
                cells.append(f"{mean:,.0f}")
            else:
                cells.append(f"{mean:.4f} ± {std:.4f}" if r["n"] > 1 else f"{mean:.4f}")
            if m in with_ci:
                cells.append(_ci_cell(r, m))
        if dups:
            cells.append("" if pd.isna(r["dup_seeds"]) else str(r["dup_seeds"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@dataclass
class Pivot:
    """Methods (the configuration less its class key) x classes; cells: mean over seeds."""
    metric: str
    method_keys: List[str]
    class_keys: List[str]
    table: pd.DataFrame   # mean over seeds, NaN where a method has no run of that class
    seeds: pd.DataFrame   # seeds per cell

    @property
    def covered(self) -> pd.Series:
        return self.table.notna().sum(axis=1)

    @property
    def mean(self) -> pd.Series:
        return self.table.mean(axis=1, skipna=True)


def method_labels(runs: pd.DataFrame, method_keys: List[str]) -> pd.Series:
    if not method_keys:
        return pd.Series("all runs", index=runs.index)
    return runs[method_keys].astype(str).agg(", ".join, axis=1)


def class_labels(runs: pd.DataFrame, class_keys: List[str]) -> pd.Series:
    return runs[class_keys].astype(str).agg("/".join, axis=1)


def pivot(runs: pd.DataFrame, keys: List[str], metric: str) -> Optional[Pivot]:
    """The per-class table, or None when no class key varies or no run logged the metric."""
    class_keys = [k for k in CLASS_KEYS if k in keys]
    if not class_keys or metric not in runs.columns or runs[metric].isna().all():
        return None
    method_keys = [k for k in keys if k not in class_keys]
    methods, classes = method_labels(runs, method_keys), class_labels(runs, class_keys)
    cells = runs[metric].groupby([methods, classes]).agg(["mean", "count"])
    rows = sorted(methods.unique(), key=lambda m: [natural_key(p) for p in m.split(", ")])
    cols = sorted(classes.unique(), key=natural_key)
    table = cells["mean"].unstack().reindex(index=rows, columns=cols)
    seeds = cells["count"].unstack().reindex(index=rows, columns=cols).fillna(0).astype(int)
    table.index.name = seeds.index.name = "method"
    return Pivot(metric, method_keys, class_keys, table, seeds)


def best_mask(values: pd.Series, lower: bool) -> pd.Series:
    """True where a value is the best of the column as shown (4 decimals): ties are all best."""
    shown = values.round(4)
    if shown.notna().sum() == 0:
        return pd.Series(False, index=values.index)
    best = shown.min() if lower else shown.max()
    return shown == best


def _pivot_cells(p: Pivot, bold) -> tuple[List[str], List[List[str]]]:
    """Header and rows of formatted cells; bold(text) marks the best of a column."""
    lower = lower_is_better(p.metric)
    total = p.table.shape[1]
    covered, mean = p.covered, p.mean
    complete = covered == total
    mean_best = best_mask(mean.where(complete), lower) & complete
    col_best = {c: best_mask(p.table[c], lower) for c in p.table.columns}
    rows = []
    for m in p.table.index:
        cells = []
        for c in p.table.columns:
            v = p.table.loc[m, c]
            cells.append("" if pd.isna(v) else (bold(f"{v:.4f}") if col_best[c][m] else f"{v:.4f}"))
        if covered[m] == 0:
            cells.append("")
        elif complete[m]:
            cells.append(bold(f"{mean[m]:.4f}") if mean_best[m] else f"{mean[m]:.4f}")
        else:
            cells.append(f"{mean[m]:.4f} ({covered[m]}/{total})")
        rows.append([str(m)] + cells)
    header = ["method (" + ", ".join(p.method_keys) + ")" if p.method_keys else "method"]
    header += [str(c) for c in p.table.columns] + ["mean"]
    return header, rows


def _pivot_note(p: Pivot) -> str:
    seeds = p.seeds.to_numpy()[p.table.notna().to_numpy()]
    n = f"{seeds.min()}" if seeds.min() == seeds.max() else f"{seeds.min()}-{seeds.max()}"
    direction = "lowest" if lower_is_better(p.metric) else "highest"
    return (f"Cells: {p.metric}, mean over seeds ({n} per cell); columns: {', '.join(p.class_keys)}; mean: over "
            f"classes. Bold: the {direction} of each column (ties all bold). (k/{p.table.shape[1]}): a mean over "
            f"only the k classes the method has, not comparable with complete rows, never bold. Empty: no run.")


def pivot_markdown(p: Pivot) -> str:
    header, rows = _pivot_cells(p, lambda t: f"**{t}**")
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in header) + " |",
             "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n\n" + _pivot_note(p) + "\n"


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def pivot_latex(p: Pivot) -> str:
    """A booktabs tabular (\\usepackage{booktabs}); names escaped, the best per column in \\textbf."""
    header, rows = _pivot_cells(p, lambda t: f"\\textbf{{{t}}}")
    esc = lambda t: t if t.startswith("\\textbf{") else latex_escape(t)  # noqa: E731
    lines = ["% " + _pivot_note(p).replace("%", "\\%"),
             "\\begin{tabular}{l" + "r" * (len(header) - 1) + "}", "\\toprule",
             " & ".join(latex_escape(h) for h in header) + " \\\\", "\\midrule"]
    lines += [" & ".join(esc(c) for c in r) + " \\\\" for r in rows]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def pivot_frame(p: Pivot) -> pd.DataFrame:
    out = p.table.copy()
    out["mean"] = p.mean
    out["classes"] = p.covered
    out["classes_total"] = p.table.shape[1]
    return out.reset_index()


def significance_cells(runs: pd.DataFrame, keys: List[str], metric: str) -> tuple[pd.DataFrame, int, str]:
    """(cells, unseeded, unit): one value of the metric per configuration (less the class key)
    and block, (class, seed) where a class key varies, else seed; runs without a seed cannot be
    paired and are counted, not used."""
    class_keys = [k for k in CLASS_KEYS if k in keys]
    method_keys = [k for k in keys if k not in class_keys]
    have = runs[runs[metric].notna()]
    seeded = have[have["_seed"].notna()]
    seed = "seed " + seeded["_seed"].astype(str)
    block = (class_labels(seeded, class_keys) + " / " + seed) if class_keys else seed
    cells = pd.DataFrame({"configuration": method_labels(seeded, method_keys), "block": block,
                          "value": seeded[metric]})
    return cells, len(have) - len(seeded), "(class, seed) cells" if class_keys else "seeds"


def heatmap(board: pd.DataFrame, rows: str, cols: str, metric: str, path: Path) -> Optional[Path]:
    if rows not in board or cols not in board or f"{metric} mean" not in board:
        return None
    table = board.groupby([rows, cols])[f"{metric} mean"].max().unstack(cols)
    if table.size < 2:
        return None
    from freqexp.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * table.shape[1], 1.2 + 0.55 * table.shape[0]))
    im = ax.imshow(table.values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=30, ha="right")
    ax.set_yticks(range(table.shape[0]), table.index)
    for i in range(table.shape[0]):
        for j in range(table.shape[1]):
            v = table.values[i, j]
            if v == v:
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w" if v < table.values[table.values == table.values].mean() else "k", fontsize=8)
    ax.set(xlabel=cols, ylabel=rows, title=f"{metric} (best over other keys)")
    fig.colorbar(im, ax=ax)
    return save_figure(fig, path)


def summary(board: pd.DataFrame, keys: List[str], n_runs: int) -> str:
    if board.empty:
        return "no finished runs match"
    top = board.iloc[0]
    config = ", ".join(f"{k}={top[k]}" for k in keys) or "(one configuration)"
    text = f"{n_runs} finished runs in {len(board)} configurations (swept: {', '.join(keys) or 'nothing'}). Best on val/auroc: {config}"
    if "val/auroc mean" in board:
        text += f" with val/auroc {top['val/auroc mean']:.4f}"
        if "val/auroc ci_low" in board and not pd.isna(top["val/auroc ci_low"]):
            text += f" ({CONFIDENCE:.0%} CI {top['val/auroc ci_low']:.4f}-{top['val/auroc ci_high']:.4f})"
    if "test/auroc mean" in board:
        text += f", test/auroc {top['test/auroc mean']:.4f}"
    text += f" (n={int(top['n'])})."
    if "dup_seeds" in board:
        repeated = board["dup_seeds"].fillna("").astype(str).str.len().gt(0).sum()
        if repeated:
            text += f" {repeated} configuration(s) ran a seed more than once: each seed counted once (its latest run; see dup_seeds)."
    return text


def write_report(df: pd.DataFrame, out: Path, metric: Optional[str] = None, significance: bool = False,
                 include_pruned: bool = False) -> tuple[List[Path], str, pd.DataFrame, List[str]]:
    """leaderboard.csv/.md, heatmaps and summary.txt for these runs; where a class key varies
    pivot.md/.tex/.csv of `metric` (default test/auroc); with significance, significance.md/.csv
    (and cd_diagram.png). Runs tagged pruned are left out unless include_pruned. Repeated seeds:
    one warning line each on stderr. Returns (files, summary, board, keys). Raises ReportError
    before writing anything when `metric` (given) was never logged or significance cannot be
    computed."""
    from freqexp import stats

    if not include_pruned:
        df = df[~pruned_mask(df)]
    keys = swept_keys(df)
    runs, repeats = seed_table(df, keys)
    board = leaderboard(df, keys, runs)
    chosen = metric or DEFAULT_METRIC
    logged = chosen in runs.columns and runs[chosen].notna().any()
    if metric is not None and not logged:
        names = sorted(c for c in runs.columns if not c.startswith("_") and c not in keys)
        raise ReportError(f"--metric {metric!r}: no matching run logged it (logged: {', '.join(names) or 'none'})")
    table = pivot(runs, keys, chosen)
    result = None
    if significance:
        if not logged:
            raise ReportError(f"--metric {chosen!r}: no matching run logged it; --significance compares on it")
        cells, unseeded, unit = significance_cells(runs, keys, chosen)
        try:
            result = stats.significance(cells, chosen, unit)
        except StatsError as e:
            raise ReportError(str(e)) from None
        if unseeded:
            print(f"freqexp.report: warning: {unseeded} run(s) without a seed param left out of --significance "
                  "(they cannot be paired)", file=sys.stderr)
    note = mixed_hardware(df, keys, runs)
    if note:
        print(note, file=sys.stderr)
    for r in repeats[:MAX_WARNINGS]:
        print(r.warning(), file=sys.stderr)
    if len(repeats) > MAX_WARNINGS:
        print(f"freqexp.report: warning: ... and {len(repeats) - MAX_WARNINGS} more repeated seeds (column dup_seeds of "
              "leaderboard.csv)", file=sys.stderr)

    out.mkdir(parents=True, exist_ok=True)
    board.to_csv(out / "leaderboard.csv", index=False)
    (out / "leaderboard.md").write_text(to_markdown(board, keys))
    figs = [heatmap(board, "model.name", "loss.spec", "val/auroc", out / "heatmap_model_loss.png"),
            heatmap(board, "model.name", "filter.name", "val/auroc", out / "heatmap_model_filter.png")]
    text = summary(board, keys, len(df))
    (out / "summary.txt").write_text(text + "\n")
    files = [out / "leaderboard.csv", out / "leaderboard.md", out / "summary.txt"] + [f for f in figs if f]
    if table is not None:
        (out / "pivot.md").write_text(pivot_markdown(table))
        (out / "pivot.tex").write_text(pivot_latex(table))
        pivot_frame(table).to_csv(out / "pivot.csv", index=False)
        files += [out / "pivot.md", out / "pivot.tex", out / "pivot.csv"]
    if result is not None:
        files += stats.write_significance(result, chosen, out)[0]
    return files, text, board, keys


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m freqexp.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", default="sqlite:///outputs/mlflow.db",
                    help="MLflow tracking URI, or tracking.uri=URI as for a run (default: %(default)s)")
    ap.add_argument("--experiment", default=None, help="experiment name, or tracking.experiment=NAME (default: all)")
    ap.add_argument("--sweep-id", default=None, help="only runs of this sweep (tag sweep_id, e.g. 2026-11-25/10-00-00)")
    ap.add_argument("--out", default="outputs/report", help="folder for leaderboard.csv/.md and heatmaps (default: %(default)s)")
    ap.add_argument("--top", type=int, default=10, help="rows printed to the terminal (default: %(default)s)")
    ap.add_argument("--metric", default=None,
                    help=f"metric of the per-class pivot and of --significance (default: {DEFAULT_METRIC})")
    ap.add_argument("--significance", action="store_true",
                    help="test whether configurations differ over paired (class, seed) cells: Wilcoxon for 2, "
                         "Friedman + Nemenyi + critical difference diagram for 3 or more")
    ap.add_argument("--include-pruned", action="store_true",
                    help="also count runs tagged pruned (left out by default: they stopped early)")
    ap.add_argument("filters", nargs="*", metavar="key=value", help="keep runs whose config has key=value")
    args = ap.parse_intermixed_args(argv)  # key=value filters before or after the options
    split_run_keys(args)
    try:
        df = load_runs(args.uri, args.experiment, args.sweep_id, args.filters, include_pruned=args.include_pruned)
    except ReportError as e:
        print(f"freqexp.report: error: {e}", file=sys.stderr)
        return 2
    where = f"{args.uri}" + (f", experiment {args.experiment!r}" if args.experiment else ", all experiments")
    if df.empty:
        print(f"freqexp.report: no finished runs match in {where}" + (f" ({' '.join(args.filters)})" if args.filters else ""), file=sys.stderr)
        return 1
    n_exp = df["experiment_id"].nunique() if "experiment_id" in df.columns else 1
    n_pruned = int(pruned_mask(df).sum())
    print(f"freqexp.report: read {len(df)} run(s) from {where}" + (f", {n_pruned} of them pruned" if n_pruned else "")
          + (f" ({n_exp} experiments)" if n_exp > 1 else ""))
    try:
        files, text, board, keys = write_report(df, Path(args.out), metric=args.metric, significance=args.significance,
                                                include_pruned=args.include_pruned)
    except ReportError as e:
        print(f"freqexp.report: error: {e}", file=sys.stderr)
        return 2
    print(to_markdown(board.head(args.top), keys))
    out = Path(args.out)
    if (out / "pivot.md").exists() and out / "pivot.md" in files:
        print((out / "pivot.md").read_text())
    if args.significance:
        print((out / "significance.md").read_text())
    print(text)
    print("written: " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The one-class benchmark table, generated from MLflow: `python -m freqexp.benchmark --uri ...
[--readme README.md] [--diagram docs/img/benchmark_cd.png]` (`make benchmark` runs the sweep, then this).

Every class of the dataset as the normal class (the other classes are the anomalies) x methods x
seeds. Rows: methods; columns: the classes, then the mean over classes; cells: test AUROC in %,
mean ± std over seeds (each seed counted once: a rerun replaces what it reruns, as in
freqexp.report). Each trained model appears under the selection protocol its runs used:

- last epoch, no labels: a fixed budget, trainer.restore_best=false, no early stopping. Nothing is
  chosen on labelled anomalies: the protocol of the published one-class figures.
- best val AUROC, labelled anomalies (row "<model> (labelled val)"): trainer.restore_best=true
  keeps the epoch with the best val/auroc, and the default validation split holds labelled images
  of the other classes, the very classes the test calls anomalous. Semi-supervised: not
  comparable with the published rows.

The raw-pixel baselines (knn, pca) fit in one pass, select nothing and are rows like any method.
Beside them, published figures for the same protocol with their sources (means only: the
per-class values are not given where they could not be checked against the paper).

A Friedman test with the Nemenyi post-hoc test (freqexp.stats) compares the measured methods over
classes as blocks, the seeds of a class averaged first, and draws the critical-difference diagram.
With --readme, the table replaces the text between the two benchmark markers."""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pandas as pd

START, END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"
EXPERIMENT = "one_class_benchmark"
METRIC = "test/auroc"
COMMAND = "make benchmark"
DEFAULT_DIAGRAM = "docs/img/benchmark_cd.png"
FASHION_MNIST = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# protocols, in the order of the table
PUBLISHED, NO_LABELS, PSEUDO, LABELLED = "published", "no labels", "pseudo anomalies", "labelled anomalies"
ORDER = (PUBLISHED, NO_LABELS, PSEUDO, LABELLED)
SUFFIX = {PSEUDO: " (pseudo val)", LABELLED: " (labelled val)"}
BASELINES = ("knn", "pca")  # the project's raw-pixel baselines
GEOM_URL = "https://papers.nips.cc/paper/2018/hash/5e62d03aec0d17facfc5355dd90d441c-Abstract.html"
GOAD_URL = "https://openreview.net/forum?id=H1lK_lBtvS"


@dataclass(frozen=True)
class Published:
    """A published figure for Fashion-MNIST, one class normal, no pretrained weights (AUROC %)."""
    method: str
    mean: float
    selection: str
    source: str                                  # markdown
    per_class: Optional[tuple] = None            # only where checked against the paper's table


PUBLISHED_ROWS = (
    Published("GOAD", 94.1, "fixed budget, no labels", f"[Bergman & Hoshen, ICLR 2020]({GOAD_URL}), Table 2"),
    Published("GEOM", 93.5, "fixed budget, no labels", f"[Golan & El-Yaniv, NeurIPS 2018]({GEOM_URL}), Table 1"),
    Published("raw-pixel OC-SVM", 92.8, "ν, γ tuned on test labels (hindsight)",
              f"reported by [Golan & El-Yaniv, NeurIPS 2018]({GEOM_URL}), Table 1 (RAW-OC-SVM)"),
)

# run params that are not a choice of method (besides report.NOT_SWEPT and the class key)
NOT_METHOD = {"seed", "model.name", "model.n_params", "trainer.restore_best", "trainer.early_stopping.enabled",
              "trainer.progress_bar", "tracking.figures"}
NOT_METHOD_PREFIX = ("data.", "resolved.", "choice.", "tracking.", "hardware.", "sweep.")
UNUSED_BY_FIT = ("trainer.", "optim.", "loss.")  # options a one-pass fit never reads


class BenchmarkError(ValueError):
    """The runs cannot give the table or test asked for; the message says what is missing."""


@functools.lru_cache(maxsize=None)
def gradient_free(model: str) -> bool:
    """True for models that fit in one pass (no epochs to select among)."""
    if model in BASELINES:
        return True
    try:
        from freqexp.models import model_class

        return bool(getattr(model_class(model), "gradient_free", False))
    except Exception:
        return False


def _truthy(value, default: bool) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    return str(value).strip().lower() in ("true", "1", "yes")


def selection_of(params: dict) -> tuple[str, str]:
    """(protocol, what the selection column says) for one run's params (keys without 'params.')."""
    if gradient_free(str(params.get("model.name"))):
        return NO_LABELS, "none (one-pass fit)"
    restore = _truthy(params.get("trainer.restore_best"), True)       # the config default
    early = _truthy(params.get("trainer.early_stopping.enabled"), False)
    if not restore and not early:
        return NO_LABELS, "last epoch, no labels"
    what = " + ".join(w for w, on in (("early stopping", early), ("best val AUROC epoch", restore)) if on)
    if str(params.get("dataset.val_anomalies")) == "pseudo":
        return PSEUDO, f"{what}, synthetic anomalies"
    return LABELLED, f"{what}, labelled anomalies"


def _params(df: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in df.columns if c.startswith("params.")]
    return df[cols].rename(columns=lambda c: c[len("params."):])


def class_key(df: pd.DataFrame) -> str:
    from freqexp.report import CLASS_KEYS

    for key in CLASS_KEYS:
        if f"params.{key}" in df.columns and df[f"params.{key}"].notna().any():
            return key
    raise BenchmarkError(f"the runs have no class key ({', '.join(CLASS_KEYS)}): a one-class benchmark varies the normal class")


def method_names(params: pd.DataFrame, key: str) -> pd.Series:
    """The model name, plus the options that differ among that model's runs (other than the class,
    the seed and the selection), e.g. `ae (trainer.max_epochs=3)`; one-pass fits ignore trainer,
    optim and loss options."""
    from freqexp.report import NOT_SWEPT, NOT_SWEPT_PREFIX

    names = params["model.name"].astype(str)
    out = names.copy()
    for model, idx in names.groupby(names).groups.items():
        sub = params.loc[idx]
        skip_prefix = NOT_SWEPT_PREFIX + NOT_METHOD_PREFIX + (UNUSED_BY_FIT if gradient_free(model) else ())
        varying = [c for c in sub.columns if c != key and c not in NOT_SWEPT and c not in NOT_METHOD
                   and not c.startswith(skip_prefix) and sub[c].fillna("∅").astype(str).nunique() > 1]
        for i in idx:
            extra = " ".join(f"{c.removeprefix('model.')}={params.at[i, c]}" for c in sorted(varying))
            out.at[i] = f"{model} ({extra})" if extra else model
    return out


@dataclass
class Row:
    label: str                   # as shown (unique)
    protocol: str
    selection: str
    source: str
    cells: Dict[str, tuple]      # class -> (mean %, std % or None, seeds)
    mean: Optional[float]        # % over the classes the row has
    mean_std: Optional[float]    # std over seeds of the seed's mean over those classes
    covered: int
    baseline: bool = False


@dataclass
class Benchmark:
    classes: List[str]
    class_names: Dict[str, str]
    rows: List[Row]
    table: pd.DataFrame          # classes (blocks) x measured methods: mean over seeds (fraction), for the test
    seeds: List[str]
    epochs: List[str]
    repeats: int = 0             # runs left out because a later run of the same seed replaced them
    notes: List[str] = field(default_factory=list)

    def row(self, label: str) -> Row:
        return next(r for r in self.rows if r.label == label)


def _values(params: pd.DataFrame, col: str) -> List[str]:
    return sorted(params.get(col, pd.Series(dtype=object)).dropna().astype(str).unique().tolist(), key=natural)


def natural(text: str):
    from freqexp.report import natural_key

    return natural_key(text)


def build(df: pd.DataFrame, metric: str = METRIC, published: Sequence[Published] = PUBLISHED_ROWS) -> Benchmark:
    """The table from finished runs (the columns of freqexp.report.load_runs)."""
    from freqexp.report import pivot, seed_table

    if df.empty:
        raise BenchmarkError("no finished runs")
    if f"metrics.{metric}" not in df.columns or pd.to_numeric(df[f"metrics.{metric}"], errors="coerce").isna().all():
        raise BenchmarkError(f"no run logged {metric}")
    key = class_key(df)
    params = _params(df)
    sel = [selection_of(p) for p in params.to_dict("records")]
    names = method_names(params, key)
    models = params["model.name"].astype(str)
    base = [f"{n} (baseline)" if m in BASELINES else n + SUFFIX.get(s[0], "") for n, m, s in zip(names, models, sel)]
    kinds: Dict[str, set] = {}
    for b_, n, s in zip(base, names, sel):
        kinds.setdefault(b_, set()).add((n, s))
    # two selections of one kind (e.g. early stopping, best epoch) stay apart, named by their selection
    labels = [b_ if len(kinds[b_]) == 1 else f"{n} ({s[1]})" for b_, n, s in zip(base, names, sel)]
    work = df.copy()
    work["params.bench.row"] = labels
    info = {lab: (s, m in BASELINES) for lab, s, m in zip(labels, sel, models)}
    keys = ["bench.row", key]
    runs, repeats = seed_table(work, keys)
    p = pivot(runs, keys, metric)
    if p is None:
        raise BenchmarkError(f"no run logged {metric}")
    classes = list(p.table.columns)
    std = runs.groupby(["bench.row", key])[metric].std(ddof=1)
    rows = []
    for label in p.table.index:
        (protocol, selection), baseline = info[label]
        cells = {}
        for c in classes:
            v = p.table.loc[label, c]
            if pd.isna(v):
                continue
            n = int(p.seeds.loc[label, c])
            s = std.get((label, c), float("nan")) if n > 1 else float("nan")
            cells[c] = (100 * v, None if pd.isna(s) else 100 * s, n)
        covered = len(cells)
        mine = runs[(runs["bench.row"] == label) & runs[metric].notna()]
        per_seed = mine.groupby(mine["_seed"].astype(str))
        complete = [g[metric].mean() for _, g in per_seed if set(g[key].astype(str)) >= set(cells)]
        mean_std = 100 * pd.Series(complete).std(ddof=1) if len(complete) > 1 else None
        rows.append(Row(label, protocol, selection, "measured", cells, 100 * p.mean[label] if covered else None,
                        mean_std, covered, baseline))
    measured = sorted(rows, key=lambda r: (ORDER.index(r.protocol), r.covered != len(classes),
                                           -(r.mean if r.mean is not None else -1), r.label))
    names_of = {c: c for c in classes}
    notes = []
    if set(params.get("dataset.name", pd.Series(dtype=object)).dropna().astype(str)) == {"fashion_mnist"}:
        names_of = {c: f"{c} {FASHION_MNIST[int(c)]}" if str(c).isdigit() and int(c) < 10 else c for c in classes}
        if len(classes) < len(FASHION_MNIST):
            notes.append(f"These runs cover {len(classes)} of the {len(FASHION_MNIST)} classes: the published means "
                         "(over all of them) are not comparable with the measured ones.")
    pub = [Row(x.method, PUBLISHED, x.selection, x.source,
               {str(i): (v, None, 0) for i, v in enumerate(x.per_class)} if x.per_class else {}, x.mean, None,
               len(classes)) for x in published]
    seeds = sorted({str(s) for s in runs["_seed"].dropna()}, key=lambda s: (len(s), s))
    one_pass = [gradient_free(m) for m in models]
    trained = params[[not f for f in one_pass]]
    epochs = _values(trained, "trainer.max_epochs")
    train_share = [f"{100 * (1 - float(v)):g} %" for v in _values(trained, "dataset.val_fraction")]
    setup = [f"Our models train on {' / '.join(train_share) or 'all'} of the normal class's training images in both "
             "protocols (the rest is the validation split)."]
    fits = _values(params[one_pass], "resolved.fit_on")
    if fits:
        fitted_all = all(v.startswith("all") for v in fits)
        setup.append("The one-pass baselines are fitted on every normal training image (trainer.fit_on=all), as their "
                     "published protocol is." if fitted_all else "Some one-pass baseline runs were fitted on the "
                     "training split only (trainer.fit_on=train), not on every normal training image.")
    limits = [f"{k}={v}" for k in ("dataset.limit_train", "dataset.limit_test") for v in _values(params, k)
              if v.lower() != "none"]
    if limits:
        setup.append(f"Subsets, not the full splits: {', '.join(limits)}.")
    return Benchmark(classes, names_of, pub + measured, p.table.T, seeds, epochs, len(df) - len(runs), setup + notes)


def _cell(v: tuple) -> str:
    mean, std, n = v
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def _mean_cell(r: Row, total: int) -> str:
    if r.mean is None:
        return ""
    text = f"{r.mean:.1f}" if r.mean_std is None else f"{r.mean:.1f} ± {r.mean_std:.1f}"
    return text if r.covered == total else f"{text} ({r.covered}/{total})"


def to_markdown(b: Benchmark, significance: Optional[str] = None, diagram: Optional[str] = None,
                command: str = COMMAND, metric: str = METRIC) -> str:
    header = ["method", "selection"] + [b.class_names[c] for c in b.classes] + ["mean", "source"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(b.classes) + 1) + "---|"]
    total = len(b.classes)
    for r in b.rows:
        name = f"**{r.label}**" if r.protocol == PUBLISHED else r.label
        cells = [_cell(r.cells[c]) if c in r.cells else "" for c in b.classes]
        lines.append("| " + " | ".join([name, r.selection] + cells + [_mean_cell(r, total), r.source]) + " |")
    seeds = ", ".join(b.seeds) or "none"
    budget = f"{', '.join(b.epochs)} epoch(s)" if b.epochs else "one-pass fits only"
    what = "AUROC" if metric == METRIC else metric
    lines += ["", f"Test {what} (%), one class normal, every other class anomalous. Cells: mean ± std over seeds "
              f"({seeds}; each seed counted once); mean: over the {total} classes, ± the std over seeds of each seed's "
              f"mean over the classes. (k/{total}): a mean over only the k classes the method has, not comparable with "
              f"complete rows. Trained models: {budget}, no pretrained weights."]
    lines += ["", "Selection: *last epoch, no labels* is a fixed budget with nothing chosen on anomalies, as in the "
              "published rows. *(labelled val)* rows keep the epoch with the best validation AUROC, and the "
              "validation split holds labelled images of the other classes, the test's anomalies: "
              "semi-supervised, not comparable with the published rows."]
    lines += ["", "Published rows (bold): the mean over the classes as printed in the source; per-class values are "
              "left empty where they were not checked against the paper. The raw-pixel OC-SVM's ν and γ were "
              "chosen on test AUROC (the official code of Golan & El-Yaniv, `experiments.py`), so it saw the "
              "test labels."]
    lines += [n for note in b.notes for n in ("", note)]
    if b.repeats:
        lines += ["", f"{b.repeats} run(s) left out: a later run of the same method, class and seed replaced them."]
    if significance:
        lines += ["", significance]
    if diagram:
        lines += ["", f"![critical-difference diagram]({diagram})"]
    lines += ["", f"Regenerate: `{command}`"]
    return "\n".join(lines) + "\n"


def _fmt_p(p: float) -> str:
    return "n/a" if p != p else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")


def significance(b: Benchmark, diagram: Optional[Path], metric: str = METRIC):
    """Friedman + Nemenyi over the measured methods, classes as blocks (seeds averaged within a class
    first); draws the critical-difference diagram to `diagram`. Returns (markdown line, result)."""
    from freqexp import stats

    unit = "classes (seeds averaged within a class)"
    coverage = b.table.notna().sum()
    partial = sorted(coverage.index[coverage < coverage.max()], key=str)  # a method short of classes would cost
    table = b.table.drop(columns=partial)                                 # every method those blocks
    try:
        result = stats.friedman_nemenyi(table, higher_is_better=not stats.lower_is_better(metric), unit=unit)
    except stats.StatsError as e:
        raise BenchmarkError(str(e).replace("--significance: ", "")) from None
    if partial:
        result.notes.append(f"left out of the test for missing classes: {', '.join(partial)}")
    verdict = ("the methods do not all perform alike" if result.pvalue < result.alpha else
               "no evidence that the methods differ; the bars are shown for completeness")
    text = (f"Friedman test over {result.n_blocks} {unit}: χ² = {result.statistic:.2f}, p = {_fmt_p(result.pvalue)} "
            f"({verdict}). Nemenyi critical difference CD = {result.cd:.2f} at α = {result.alpha}: average ranks further "
            f"apart than this differ; the diagram joins the methods the test cannot tell apart. Published rows are "
            f"not in the test (no per-class values).")
    if result.notes:
        text += " " + " ".join(n[0].upper() + n[1:] + "." for n in result.notes)
    if diagram is not None:
        diagram.parent.mkdir(parents=True, exist_ok=True)
        stats.cd_diagram(result, diagram, title=f"{metric}: average rank over {result.n_blocks} classes, seeds averaged within a class (1 = best)")
    return text, result


def replace_section(text: str, body: str, path: str = "the README") -> str:
    if START not in text or END not in text:
        raise SystemExit(f"freqexp.benchmark: error: {path} has no {START} ... {END} markers to replace "
                         "(add the two lines where the table goes)")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body}{END}{tail}"


def relative_link(target: Path, readme: Optional[Path]) -> str:
    base = readme.resolve().parent if readme else Path.cwd()
    return Path(os.path.relpath(target.resolve(), base)).as_posix()


def main(argv: Optional[Sequence[str]] = None) -> int:
    from freqexp.report import runs_for_table

    ap = argparse.ArgumentParser(prog="python -m freqexp.benchmark", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", default="sqlite:///outputs/benchmark.db", help="MLflow tracking URI (default: %(default)s)")
    ap.add_argument("--experiment", default=EXPERIMENT, help="experiment name (default: %(default)s)")
    ap.add_argument("--readme", default=None, help="write the table into this file between the benchmark markers")
    ap.add_argument("--diagram", default=DEFAULT_DIAGRAM,
                    help="critical-difference diagram (PNG) to write; 'none' for no diagram (default: %(default)s)")
    ap.add_argument("--metric", default=METRIC, help="the metric of the table and the test (default: %(default)s)")
    ap.add_argument("--command", default=COMMAND, help="the command printed under the table (default: %(default)s)")
    args = ap.parse_args(argv)

    readme = Path(args.readme) if args.readme else None
    if readme is not None:  # before anything is computed or written
        if not readme.exists():
            raise SystemExit(f"freqexp.benchmark: error: --readme {readme}: no such file")
        replace_section(readme.read_text(), "", str(readme))
    df, rc = runs_for_table("freqexp.benchmark", args.uri, args.experiment)
    if df is None:
        return rc
    try:
        b = build(df, args.metric)
    except BenchmarkError as e:
        print(f"freqexp.benchmark: error: {e}", file=sys.stderr)
        return 2
    diagram = None if args.diagram.lower() == "none" else Path(args.diagram)
    text, link = None, None
    try:
        text, _ = significance(b, diagram, args.metric)
        link = relative_link(diagram, readme) if diagram is not None else None
    except BenchmarkError as e:
        print(f"freqexp.benchmark: warning: no significance test or diagram: {e}", file=sys.stderr)
    body = to_markdown(b, text, link, args.command, args.metric)
    print(body)
    written = []
    if link:
        written.append(str(diagram))
    if readme is not None:
        readme.write_text(replace_section(readme.read_text(), body, str(readme)))
        written.append(str(readme))
    if written:
        print("written: " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The model-zoo table, generated from MLflow: `python -m freqexp.zoo --uri ... --experiment model_zoo
[--readme README.md]`.

One row per finished run of the experiment (every model at one budget, see `make zoo`): test
AUROC and AP, train and inference images/s, parameters. Rows are ordered by test AUROC: this is a
report of fixed configurations, nothing is selected on it. The raw-pixel baselines (knn, pca)
are rows like any model, and every model that does not beat the raw-pixel kNN baseline is named
under the table. With --readme, the table replaces the text between the two zoo markers."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import pandas as pd

START, END = "<!-- zoo:start -->", "<!-- zoo:end -->"
BASELINE = "knn"  # the reference every model must beat
BASELINES = ("knn", "pca")  # raw-pixel baselines: rows of the table, not candidates
# options that tell apart several runs of one model (e.g. patchcore at 3 sampling ratios)
NOT_DISTINGUISHING = {"model.name", "seed", "tracking.uri", "tracking.experiment", "trainer.progress_bar"}


def variant_label(df: pd.DataFrame) -> pd.Series:
    """model name, plus the model options that differ among that model's runs."""
    labels = df["params.model.name"].astype(str).copy()
    model_cols = [c for c in df.columns if c.startswith("params.model.") and c[len("params."):] not in NOT_DISTINGUISHING]
    other_cols = [c for c in df.columns if c.startswith(("params.loss.spec", "params.augment.name", "params.filter.name"))]
    for name, idx in df.groupby("params.model.name").groups.items():
        if len(idx) < 2:
            continue
        sub = df.loc[idx]
        varying = [c for c in model_cols + other_cols if sub[c].fillna("∅").nunique() > 1]
        for i in idx:
            extra = " ".join(f"{c[len('params.'):].removeprefix('model.')}={df.at[i, c]}" for c in varying)
            labels.at[i] = f"{name} ({extra})" if extra else name
    return labels


def zoo_table(df: pd.DataFrame) -> pd.DataFrame:
    num = lambda col: pd.to_numeric(df.get(col, pd.Series(index=df.index, dtype=float)), errors="coerce")  # noqa: E731
    table = pd.DataFrame({
        "model": variant_label(df),
        "family": df.get("tags.model", df["params.model.name"]),
        "loss": df.get("params.loss.spec", pd.Series("", index=df.index)).fillna(""),
        "augment": df.get("params.augment.name", pd.Series("", index=df.index)).fillna(""),
        "epochs": num("metrics.train/epochs"),
        "test/auroc": num("metrics.test/auroc"),
        "test/ap": num("metrics.test/ap"),
        "val/auroc": num("metrics.val/auroc"),
        "train img/s": num("metrics.train/throughput"),
        "inference img/s": num("metrics.test/throughput"),
        "params": num("params.model.n_params"),
    })
    table = table.sort_values("model", kind="stable")  # ties in AUROC: by name, so the table is stable
    return table.sort_values("test/auroc", ascending=False, kind="stable").reset_index(drop=True)


def below_baseline(table: pd.DataFrame) -> tuple[Optional[float], List[str]]:
    base = table.loc[table["family"] == BASELINE, "test/auroc"]
    if base.empty:
        return None, []
    ref = float(base.max())
    return ref, [m for m, f, a in zip(table["model"], table["family"], table["test/auroc"]) if f not in BASELINES and not a > ref]


def to_markdown(table: pd.DataFrame, command: str) -> str:
    cols = ["#", "model", "loss", "epochs", "test AUROC", "test AP", "val AUROC", "train img/s", "inference img/s", "parameters"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    fmt_int = lambda v: "" if pd.isna(v) else f"{v:,.0f}"  # noqa: E731
    fmt = lambda v: "" if pd.isna(v) else f"{v:.4f}"  # noqa: E731
    for i, r in table.iterrows():
        loss = "—" if r["family"] in GRADIENT_FREE else r["loss"]
        epochs = "fit" if r["family"] in GRADIENT_FREE else fmt_int(r["epochs"])
        name = f"**{r['model']}** (baseline)" if r["family"] in BASELINES else r["model"]
        lines.append("| " + " | ".join([str(i + 1), name, loss, epochs, fmt(r["test/auroc"]), fmt(r["test/ap"]), fmt(r["val/auroc"]),
                                         fmt_int(r["train img/s"]), fmt_int(r["inference img/s"]), fmt_int(r["params"])]) + " |")
    ref, weak = below_baseline(table)
    if ref is not None:
        lines.append("")
        if weak:
            lines.append(f"Not better than the raw-pixel kNN baseline (test AUROC {ref:.4f}) at this budget: {', '.join(weak)}.")
        else:
            lines.append(f"Every model beats the raw-pixel kNN baseline (test AUROC {ref:.4f}) at this budget.")
    lines += ["", f"Regenerate: `{command}`"]
    return "\n".join(lines) + "\n"


GRADIENT_FREE = ("knn", "pca", "patchcore", "wedge", "patchcore_dwt")


def replace_section(text: str, body: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"freqexp.zoo: error: the README has no {START} ... {END} markers to replace")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body}{END}{tail}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from freqexp.report import runs_for_table

    ap = argparse.ArgumentParser(prog="python -m freqexp.zoo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", default="sqlite:///outputs/zoo.db", help="MLflow tracking URI (default: %(default)s)")
    ap.add_argument("--experiment", default="model_zoo", help="experiment name (default: %(default)s)")
    ap.add_argument("--readme", default=None, help="write the table into this file between the zoo markers")
    ap.add_argument("--command", default="make zoo", help="the command printed under the table (default: %(default)s)")
    args = ap.parse_args(argv)
    df, rc = runs_for_table("freqexp.zoo", args.uri, args.experiment)
    if df is None:
        return rc
    body = to_markdown(zoo_table(df), args.command)
    print(body)
    if args.readme:
        path = Path(args.readme)
        path.write_text(replace_section(path.read_text(), body))
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

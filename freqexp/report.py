"""Leaderboards from MLflow: `python -m freqexp.report [options] [key=value ...]`.

Reads finished runs (pandas via mlflow.search_runs), groups them by the config keys that vary
among them (the swept keys), averages over seeds (mean, std, n), and writes leaderboard.csv,
leaderboard.md, heatmaps (model x loss, model x filter) and a short summary. Rows are sorted by
val/auroc, the objective sweeps optimize; test metrics are shown beside it, never used to rank."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import pandas as pd

METRICS = ["val/auroc", "val/ap", "test/auroc", "test/ap", "test/f1", "test/balanced_acc", "test/pixel_auroc",
           "train/throughput", "test/throughput"]
# params that differ between runs without being an experimental choice
NOT_SWEPT = {"seed", "tracking.uri", "tracking.experiment", "trainer.progress_bar", "data.root", "dataset.root",
             "resolved.accelerator", "resolved.precision", "hardware.accelerator", "hardware.precision", "hardware.devices"}
NOT_SWEPT_PREFIX = ("data.",)


def load_runs(uri: str, experiment: Optional[str], sweep_id: Optional[str], filters: Sequence[str]) -> pd.DataFrame:
    import mlflow

    from freqexp.tracking import resolve_uri

    mlflow.set_tracking_uri(resolve_uri(uri))
    clauses = ["attributes.status = 'FINISHED'"]
    if sweep_id:
        clauses.append(f"tags.sweep_id = '{sweep_id}'")
    for f in filters:
        key, sep, value = f.partition("=")
        if not sep:
            raise SystemExit(f"freqexp.report: error: filter {f!r} must be key=value (a config key, e.g. model.name=cae)")
        clauses.append(f"params.`{key}` = '{value}'")
    names = [experiment] if experiment else None
    df = mlflow.search_runs(experiment_names=names, search_all_experiments=names is None, filter_string=" and ".join(clauses),
                            max_results=100000)
    if "tags.kind" in df.columns:
        df = df[df["tags.kind"].isna()]  # analyses and reports are not experiments
    return df


def swept_keys(df: pd.DataFrame) -> List[str]:
    keys = []
    for col in df.columns:
        if not col.startswith("params."):
            continue
        key = col[len("params."):]
        if key in NOT_SWEPT or key.startswith(NOT_SWEPT_PREFIX):
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


def leaderboard(df: pd.DataFrame, keys: List[str]) -> pd.DataFrame:
    metrics = [m for m in METRICS if f"metrics.{m}" in df.columns]
    work = pd.DataFrame({k: df[f"params.{k}"].fillna("∅") for k in keys}) if keys else pd.DataFrame(index=df.index)
    for m in metrics:
        work[m] = pd.to_numeric(df[f"metrics.{m}"], errors="coerce")
    work["_seed"] = df.get("params.seed", pd.Series(["?"] * len(df), index=df.index))
    grouped = work.groupby(keys, dropna=False) if keys else work.groupby(lambda _: "all")
    rows = []
    for name, g in grouped:
        row = dict(zip(keys, name if isinstance(name, tuple) else (name,))) if keys else {}
        row["n"] = len(g)
        for m in metrics:
            row[f"{m} mean"] = g[m].mean()
            row[f"{m} std"] = g[m].std(ddof=1) if len(g) > 1 else 0.0
        rows.append(row)
    board = pd.DataFrame(rows)
    if "val/auroc mean" in board:
        board = board.sort_values("val/auroc mean", ascending=False, kind="stable")
    return board.reset_index(drop=True)


def to_markdown(board: pd.DataFrame, keys: List[str]) -> str:
    metrics = [m for m in METRICS if f"{m} mean" in board.columns]
    header = ["#"] + keys + ["n"] + metrics
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, r in board.iterrows():
        cells = [str(i + 1)] + [str(r[k]) for k in keys] + [str(int(r["n"]))]
        for m in metrics:
            mean, std = r[f"{m} mean"], r[f"{m} std"]
            if pd.isna(mean):
                cells.append("")
            elif "throughput" in m:
                cells.append(f"{mean:,.0f}")
            else:
                cells.append(f"{mean:.4f} ± {std:.4f}" if r["n"] > 1 else f"{mean:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
    if "test/auroc mean" in board:
        text += f", test/auroc {top['test/auroc mean']:.4f}"
    return text + f" (n={int(top['n'])})."


def write_report(df: pd.DataFrame, out: Path) -> tuple[List[Path], str, pd.DataFrame, List[str]]:
    """leaderboard.csv/.md, heatmaps and summary.txt for these runs; returns (files, summary, board, keys)."""
    keys = swept_keys(df)
    board = leaderboard(df, keys)
    out.mkdir(parents=True, exist_ok=True)
    board.to_csv(out / "leaderboard.csv", index=False)
    (out / "leaderboard.md").write_text(to_markdown(board, keys))
    figs = [heatmap(board, "model.name", "loss.spec", "val/auroc", out / "heatmap_model_loss.png"),
            heatmap(board, "model.name", "filter.name", "val/auroc", out / "heatmap_model_filter.png")]
    text = summary(board, keys, len(df))
    (out / "summary.txt").write_text(text + "\n")
    files = [out / "leaderboard.csv", out / "leaderboard.md", out / "summary.txt"] + [f for f in figs if f]
    return files, text, board, keys


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m freqexp.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", default="sqlite:///outputs/mlflow.db", help="MLflow tracking URI (default: %(default)s)")
    ap.add_argument("--experiment", default=None, help="experiment name (default: all)")
    ap.add_argument("--sweep-id", default=None, help="only runs of this sweep (tag sweep_id, e.g. 2026-11-25/10-00-00)")
    ap.add_argument("--out", default="outputs/report", help="folder for leaderboard.csv/.md and heatmaps (default: %(default)s)")
    ap.add_argument("--top", type=int, default=10, help="rows printed to the terminal (default: %(default)s)")
    ap.add_argument("filters", nargs="*", metavar="key=value", help="keep runs whose config has key=value")
    args = ap.parse_args(argv)

    df = load_runs(args.uri, args.experiment, args.sweep_id, args.filters)
    if df.empty:
        print("freqexp.report: no finished runs match", file=sys.stderr)
        return 1
    files, text, board, keys = write_report(df, Path(args.out))
    print(to_markdown(board.head(args.top), keys))
    print(text)
    print("written: " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())

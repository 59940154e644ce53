"""One run: compose -> validate -> data -> model -> fit -> evaluate -> log -> objective.
`task(cfg)` is what the Hydra entry point calls; it turns failures into one-line errors
(single run) or a FAILED MLflow run and a status file (sweep job), never a dead sweep."""
from __future__ import annotations

import functools
import getpass
import json
import logging
import os
import subprocess
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import DictConfig, OmegaConf

from freqexp.multirun import figures, pruning
from freqexp import errors
from freqexp.errors import FreqexpError
from freqexp.objective import STATUS_FILE, objectives
from freqexp.validate import Plan, make_plan

log = logging.getLogger("freqexp")


@dataclass
class RunResult:
    metrics: Dict[str, float]
    run_id: Optional[str]
    output_dir: Path
    tracking_uri: str
    info: Dict[str, Any] = field(default_factory=dict)
    skipped: bool = False  # resumed sweep: this config already has a FINISHED run


TIMING_FILE = "timing.json"  # in the run dir: each phase's seconds and the process's milestones (freqexp.timing)

def config_hash(cfg: DictConfig) -> str:
    """What resume matches a finished run by: the composed config less its run-control keys
    (freqexp.tracking.RUN_CONTROL: the store, scheduling, hardware placement, caches)."""
    import hashlib

    from freqexp.tracking import without_run_control

    container = without_run_control(OmegaConf.to_container(cfg, resolve=True))
    return hashlib.sha1(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The checkout's commit, asked once per process (a sweep's worker runs many jobs)."""
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*isinstance.*treespec.*")
    warnings.filterwarnings("ignore", message=".*configure_optimizers.* returned `None`.*")  # gradient-free fits
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")  # frozen backbones
    warnings.filterwarnings("ignore", message=".*but have no `val_dataloader`.*")  # a one-pass model fitted on every normal image


def build_trainer(cfg, plan: Plan, callbacks: list, max_epochs: int | None = None):
    from freqexp.lightning_import import import_lightning

    L = import_lightning()
    from lightning.pytorch.callbacks import EarlyStopping, TQDMProgressBar

    from freqexp.training import EpochLines

    t = cfg.trainer
    if t.early_stopping.enabled and plan.validated:
        callbacks.append(EarlyStopping(monitor="val/auroc", mode="max", patience=t.early_stopping.patience, min_delta=t.early_stopping.min_delta))
    terminal = sys.stderr.isatty()  # a bar redraws with \r: only on a terminal
    # a gradient-free fit is one pass that the module reports itself (freqexp.progress)
    bar = bool(t.progress_bar) and terminal and not plan.model.gradient_free
    if bar:
        callbacks.append(TQDMProgressBar(leave=False))
    elif t.progress_bar and not terminal:  # nohup, SLURM logs, pipes: one plain line per epoch instead
        callbacks.append(EpochLines())
    return L.Trainer(
        accelerator=plan.hardware.accelerator,
        devices=[plan.hardware.device.index] if plan.hardware.device.index is not None else 1,
        precision=plan.hardware.precision,
        max_epochs=t.max_epochs if max_epochs is None else max_epochs,
        check_val_every_n_epoch=1 if plan.model.gradient_free else t.val_every_n_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bar,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


CHOICE_GROUPS = ("model", "loss", "filter", "augment", "dataset", "optim", "hardware")


def group_choices() -> dict:
    """The option chosen in each config group (filter=fair, optim=draem, ...), when Hydra composed
    the run: logged as params choice.<group>, so runs of two presets of one family (fair and bhpf
    are both filter.name=fft) stay apart in reports."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices
    except (ImportError, ValueError):  # composed without Hydra's app (tests, the API)
        return {}
    return {g: str(choices[g]) for g in CHOICE_GROUPS if choices.get(g) is not None}


# overrides that a run name leaves out: they are in the name already (or Hydra's); run-control
# keys (freqexp.tracking.is_run_control) change nothing computed and are left out too
NAME_SKIPS = ("model", "loss", "filter", "dataset", "seed", "hydra")


def dataset_label(cfg) -> str:
    """fashion_mnist[0], mvtec[bottle], tiff_domains[domain_A], synthetic: the data and its normal
    part; a zero-shot run adds where it was trained: visa[all]<-mvtec."""
    d = cfg.dataset
    if d.get("train_from"):
        category = d.get("category") if "category" in d and not OmegaConf.is_missing(d, "category") else "all"
        return f"{d.name}[{category or 'all'}]<-{d.train_from}"
    for key in ("normal_class", "category", "domain"):
        value = d.get(key) if key in d else None
        if value is not None and not OmegaConf.is_missing(d, key):
            value = ",".join(str(v) for v in value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else str(value)
            return f"{d.name}[{value}]"
    return str(d.name)


def run_label(cfg, overrides: Optional[list] = None, limit: int = 120) -> str:
    """A run name that says what ran, model first: `cae · mse+ssim · bhpf · fashion_mnist[0] · s0`,
    then any other override of the command (`trainer.max_epochs=3`), cut to `limit` characters."""
    from freqexp.tracking import is_run_control

    choices = group_choices()
    parts = [str(cfg.model.name), str(cfg.loss.spec), choices.get("filter", str(cfg.filter.name)), dataset_label(cfg), f"s{cfg.seed}"]
    if choices.get("augment") not in (None, "none"):
        parts.insert(3, f"aug={choices['augment']}")
    extra = []
    for item in overrides or []:
        key = item.split("=", 1)[0].lstrip("+~")
        if not (is_run_control(key) or any(key == s or key.startswith(s + ".") for s in NAME_SKIPS)):
            extra.append(item.lstrip("+"))
    name = " · ".join(parts + extra)
    return name if len(name) <= limit else name[: limit - 1] + "…"


def log_dataset_inputs(tracker, cfg, data) -> None:
    """The data as MLflow dataset inputs (one per split, context train/validation/test), so the
    runs table's Dataset column says what each run read (Tracker.log_datasets; best effort)."""
    import hashlib

    name = dataset_label(cfg)
    source = str(data.info.get("root") or f"{cfg.dataset.name} (generated, split_seed={cfg.dataset.get('split_seed')})")
    datasets = []
    for split, context in (("train", "training"), ("val", "validation"), ("test", "testing")):
        part = getattr(data, split)
        profile = {"images": len(part), "anomalous": int(part.n_anomalous), "shape": list(part.images.shape[1:])}
        spec = json.dumps({"dataset": OmegaConf.to_container(cfg.dataset, resolve=True), "split": split, **profile}, sort_keys=True, default=str)
        datasets.append({"name": name, "digest": hashlib.sha1(spec.encode()).hexdigest()[:10], "source": json.dumps({"uri": source}),
                         "profile": json.dumps(profile), "context": context})
    tracker.log_datasets(datasets)


def execute(cfg: DictConfig, output_dir: Path, run_name: Optional[str] = None, tags: Optional[Dict[str, str]] = None,
            resume: bool = False) -> RunResult:
    """Run one experiment. Raises FreqexpError for bad config or data before any MLflow run
    exists; once the run is open, any exception ends it FAILED with the error recorded. With
    `resume`, a config that already has a FINISHED run in the experiment is not run again.
    Each phase is timed (freqexp.timing): sys/seconds_<phase> in MLflow, timing.json in the run dir.
    Long steps report their progress unless trainer.progress_bar is false (freqexp.progress)."""
    from freqexp import progress

    with progress.settings(enabled=cfg.trainer.get("progress_bar") is not False):
        return _execute(cfg, output_dir, run_name, tags, resume)


def _execute(cfg: DictConfig, output_dir: Path, run_name: Optional[str], tags: Optional[Dict[str, str]], resume: bool) -> RunResult:
    from freqexp.timing import Phases

    phase = Phases()
    with phase("plan"):
        plan = make_plan(cfg)  # 1. every value checked, components built
    with phase("store"):
        from freqexp.multirun.orphans import where_tags
        from freqexp.store_process import open_tracker

        tracker = open_tracker(cfg.tracking.uri, cfg.tracking.experiment)  # in a process of its own for a single run (store_process)
        chash = config_hash(cfg)
        done = tracker.find_finished(chash) if resume else None
    if done is not None:
        return RunResult({k: float(v) for k, v in done.data.metrics.items()}, done.info.run_id, output_dir, tracker.uri, skipped=True)

    import torch

    from freqexp.data import IndexBatches, StepGroups, build_dataset
    from freqexp.data.base import ZERO_SHOT, validation_protocol, with_all_normals
    from freqexp.data.pseudo import pseudo_generator_for, trains_on_augment, with_expanded_train, with_pseudo_val
    from freqexp.tracking import flatten

    quiet_lightning()
    with phase("data"):
        data = build_dataset(cfg.dataset)  # 2. data (DataError before any run is opened)
        if not plan.zero_shot:  # zero-shot: trained on another dataset's labelled images, no validation (fixed epochs)
            data = with_expanded_train(data, plan.augment)
            if plan.fit_all:  # a one-pass model: the held-out normals join its fit, nothing is validated
                data = with_all_normals(data, cfg.dataset.get("limit_train"))
            elif cfg.dataset.get("val_anomalies") == "pseudo":
                generator = pseudo_generator_for(cfg.dataset, plan.augment, trains_on_augment(plan.model, plan.augment))
                data = with_pseudo_val(data, plan.augment, cfg.dataset.split_seed, generator=generator)
    if len(data.train) == 0:
        raise FreqexpError("dataset: the training split is empty")
    plan.model.check_fit(len(data.train), plan.hardware.device)
    if plan.validated and data.val.n_anomalous in (0, len(data.val)):
        raise FreqexpError(f"dataset.val_fraction: the validation split has {len(data.val) - data.val.n_anomalous} normal and "
                           f"{data.val.n_anomalous} anomalous images; it needs both (raise dataset.val_fraction or dataset.val_anomaly_ratio)")
    output_dir.mkdir(parents=True, exist_ok=True)
    protocol = ZERO_SHOT if plan.zero_shot else validation_protocol(cfg.dataset.get("val_anomalies"), plan.validated)
    run_tags = {"mlflow.user": getpass.getuser(), "mlflow.source.name": "python -m freqexp", "git_commit": git_commit(),
                "config_hash": chash, "model": cfg.model.name, "loss": cfg.loss.spec, "filter": cfg.filter.name,
                "dataset": cfg.dataset.name, "output_dir": str(output_dir.resolve()),
                "protocol": protocol, **where_tags(), **(tags or {})}
    with phase("run_start"):
        run_id = tracker.start(run_name or run_label(cfg), run_tags)
    previous_sigterm = on_sigterm_raise_interrupt()
    try:
        with phase("run_start"):
            params = flatten(OmegaConf.to_container(cfg, resolve=True))
            reduction = cfg.score.reduction
            params["resolved.score"] = plan.model.score_description() if reduction == "auto" else f"{reduction} of the anomaly map"
            params.update({f"choice.{group}": option for group, option in group_choices().items()})
            params.update(protocol_params(cfg, plan, data, protocol))
            params.update({"resolved.accelerator": plan.hardware.accelerator, "resolved.precision": plan.hardware.precision,
                           "resolved.channels_last": plan.hardware.channels_last,
                           "resolved.cpu_threads": torch.get_num_threads(), "model.n_params": sum(p.numel() for p in plan.model.parameters())})
            params.update({f"data.{k}": v for k, v in data.counts().items()})
            if "root" in data.info:
                params["data.root"] = data.info["root"]
            tracker.log_params(params)
            log_dataset_inputs(tracker, cfg, data)
            (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

        device = plan.hardware.device
        with phase("setup"):
            from freqexp.data.cache import cache_dir_of, place

            # 3. the dataset lives on the training device, or memory-mapped on the host when too large (dataset.cache)
            data = place(data, device, cfg.dataset.get("cache", "auto"), cache_dir_of(cfg.dataset))
            from freqexp.training import BestWeights, EpochMetricsLogger, TrainTimer, build_module, steps_per_call

            module = build_module(plan, cfg)
            timer = TrainTimer()
            callbacks: list = [EpochMetricsLogger(tracker.log_epoch_metrics), timer]
            # a gradient-free fit is one pass: there is no earlier epoch to go back to
            best = BestWeights() if cfg.trainer.restore_best and plan.validated and not plan.model.gradient_free else None
            if best:
                callbacks.append(best)
            trial = pruning.current()
            if trial is not None and pruning.reports_every_epoch(cfg):  # an Optuna trial: report each epoch, stop if pruned
                callbacks += [pruning.objective_so_far(objectives(cfg)[0], best), pruning.callback(trial)]
            trainer = build_trainer(cfg, plan, callbacks, max_epochs=module.max_epochs)
            # a model trained on labelled images (the zero-shot protocol) gets their labels and masks with each batch
            supervised = plan.zero_shot and not plan.model.gradient_free
            train_tensors = (data.train.images, data.train.labels, data.train.masks) if supervised else (data.train.images,)
            train_batches = IndexBatches(*train_tensors, batch_size=cfg.trainer.batch_size, shuffle=True, seed=cfg.seed, device=device)
            group = steps_per_call(cfg.trainer.get("steps_per_call", "auto"), module, device, train_tensors)
            tracker.log_params({"resolved.steps_per_call": group})
            if group > 1:  # one pass of Lightning's loop trains on `group` batches, a step each
                train_batches = StepGroups(train_batches, group)
            val_batches = (IndexBatches(data.val.images, data.val.labels, batch_size=cfg.trainer.eval_batch_size, device=device)
                           if len(data.val) else None)
            from freqexp.evaluate import reset_peak_memory

            reset_peak_memory(device)
        with phase("fit"):
            trainer.fit(module, train_dataloaders=train_batches, val_dataloaders=val_batches)  # 6. fit
        if trainer.interrupted:
            raise KeyboardInterrupt("training was interrupted")
        module.to(device)

        from freqexp.evaluate import evaluate

        with phase("evaluate"):
            metrics, scored = evaluate(module, data, cfg.trainer.eval_batch_size)  # 7. evaluate
        metrics["train/throughput"] = module.images_seen / max(timer.seconds, 1e-9)
        metrics["train/seconds"] = phase.seconds["fit"]
        metrics["train/epochs"] = trainer.current_epoch
        if best and best.best_epoch is not None:
            metrics["val/best_epoch"] = best.best_epoch + 1  # 1-based, as the val_epoch/* steps
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))

        with phase("artifacts"):
            torch.save(module.model.state_dict(), output_dir / "model.pt")  # for analyses of this run
            artifacts = [output_dir / "config.yaml", output_dir / "metrics.json", output_dir / "model.pt"]
        figures_mode = figures.mode(cfg)  # all: draw now; best: save what to draw (figures.npz), drawn if among a sweep's best
        if figures_mode != "none":
            with phase("figures"):
                fd = figures.figure_data(module, data, scored, metrics)
                artifacts += figures.draw(fd, output_dir) if figures_mode == "all" else [figures.save(fd, output_dir / figures.NPZ)]
        with phase("artifacts"):
            tracker.log_artifacts(artifacts)
        with phase("run_end"):  # the final metrics (with the phases timed so far), the status, the run's end
            # a single run's process before the run (Python, imports, the command line, the config); a sweep's worker
            # runs job after job, so the age of its process says nothing about one job
            before = {"sys/seconds_before_run": phase.before} if (tags or {}).get("mode") == "run" and phase.before is not None else {}
            tracker.log_metrics({**metrics, **phase.metrics(), **before}, step=trainer.current_epoch)
            tracker.set_tags({"status": "finished"})
            tracker.end("FINISHED")
        (output_dir / TIMING_FILE).write_text(json.dumps(phase.record(), indent=2))
        return RunResult(metrics, run_id, output_dir, tracker.uri, {"normal": data.info.get("normal_classes"),
                                                                     "experiment_id": tracker.experiment_id,
                                                                     "phases": dict(phase.seconds),
                                                                     "before_run": before.get("sys/seconds_before_run")})
    except BaseException as e:  # the run must never be left RUNNING
        if pruning.is_pruned(e):  # the search's pruner stopped it: not a failure, and not a result
            e.pruned_epoch = int(trainer.current_epoch) + 1
            try:
                tracker.flush()  # the curve up to the pruned epoch
                tracker.set_tags({"status": "pruned", "pruned": "true", "pruned_epoch": e.pruned_epoch})
            finally:
                tracker.end("KILLED")
            raise
        # Lightning turns an interrupt during fit into SystemExit (and SIGTERM into SIGTERMException, a SystemExit)
        status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
        try:
            err = output_dir / "error.txt"
            err.write_text(traceback.format_exc())
            tracker.flush()  # the epochs it trained, before it failed
            tracker.set_tags({"status": status.lower(), "error": one_line(e), "error_type": type(e).__name__})
            tracker.log_artifacts([err])
        finally:
            tracker.end(status)
        raise
    finally:
        restore_sigterm(previous_sigterm)


def protocol_params(cfg, plan, data, protocol: str) -> Dict[str, str]:
    """What the run was fitted on, what validated it (`protocol`, freqexp.data.base.validation_protocol)
    and where pixels were scored, in words (params: resolved.protocol, resolved.fit_on, resolved.pixel_region)."""
    from freqexp.data.base import UNSUPERVISED

    val_anomalies = cfg.dataset.get("val_anomalies")
    if plan.zero_shot:
        d, info = cfg.dataset, data.info
        target = f"{len(info.get('categories') or [])} categories of {d.name} ({d.root})"
        return {"resolved.protocol": f"zero-shot: trained on {d.train_from} ({d.train_root}), tested on {target}; nothing of "
                                     f"{d.name} is seen before testing; no validation: trainer.max_epochs epochs, the last epoch's weights",
                "resolved.fit_on": (f"train_from: the {len(data.train)} labelled test images of {d.train_from} "
                                    f"({data.train.n_anomalous} anomalous, with masks), every category" if not plan.model.gradient_free
                                    else "nothing: training-free")}
    if plan.fit_all:
        why = "no validation: the model was fitted on every normal training image"
    elif protocol == UNSUPERVISED:
        why = "validation anomalies are synthetic (dataset.val_anomalies=pseudo)"
    else:
        why = (f"validation holds real anomalies (dataset.val_anomalies={val_anomalies}): selecting on them is "
               "semi-supervised; dataset.val_anomalies=pseudo for the unsupervised protocol")
    out = {"resolved.protocol": f"{protocol}: {why}",
           "resolved.fit_on": (f"all: the {len(data.train)} normal training images, held-out ones included" if plan.fit_all
                               else f"train: {len(data.train)} images, validation held out")}
    region = plan.model.evaluated_region(plan.shape[1:])
    if region is not None:
        top, left, h, w = region
        out["resolved.pixel_region"] = (f"rows {top}-{top + h - 1}, columns {left}-{left + w - 1} ({h}x{w} of "
                                        f"{plan.shape[1]}x{plan.shape[2]}): the centre crop the model sees")
    return out


def on_sigterm_raise_interrupt():
    """While a run is open, SIGTERM (a cluster's kill, `kill PID`) interrupts it so it ends KILLED
    instead of RUNNING forever. Returns the previous handler (None off the main thread)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    return signal.signal(signal.SIGTERM, interrupt)


def restore_sigterm(previous) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def one_line(e: BaseException) -> str:
    """The error as a run reports it: a FreqexpError's own line, any other prefixed with its type."""
    text = errors.one_line(e)
    return text if isinstance(e, FreqexpError) else f"{type(e).__name__}: {text}"


def summary(cfg, result: RunResult) -> str:
    m = result.metrics
    normal = result.info.get("normal")
    lines = [
        f"freqexp: finished model={cfg.model.name} loss={cfg.loss.spec} filter={cfg.filter.name} dataset={cfg.dataset.name}"
        + (f" (normal: {', '.join(normal)})" if normal else ""),
    ]
    if "val/auroc" in m:
        lines += [f"  val   AUROC {m['val/auroc']:.4f}   AP {m['val/ap']:.4f}   (the sweep objective is val/auroc)",
                  f"  test  AUROC {m['test/auroc']:.4f}   AP {m['test/ap']:.4f}   F1 {m['test/f1']:.4f}   ACC {m['test/acc']:.4f}"
                  f"   balanced ACC {m['test/balanced_acc']:.4f}   (threshold chosen on val)"]
    else:  # a one-pass model fitted on every normal training image (trainer.fit_on), or zero-shot: no validation, no threshold
        if cfg.dataset.get("train_from"):
            lines.append(f"  val   none: zero-shot, trained on {cfg.dataset.train_from} for a fixed number of epochs; "
                         f"{cfg.dataset.name} is seen only at test time")
        else:
            lines.append("  val   none: fitted on every normal training image (trainer.fit_on=train keeps a validation split)")
        if "test/categories" in m:
            lines.append(f"  test  mean over {int(m['test/categories'])} categories (per category: test/category/<name>/*; "
                         f"pooled over images: AUROC {m['test/pooled_auroc']:.4f})")
        lines += [f"  test  AUROC {m['test/auroc']:.4f}   AP {m['test/ap']:.4f}   F1-max {m['test/f1_best']:.4f}   "
                  "(F1 at the best threshold on the test, as anomalib's F1-max)"]
    if "test/pixel_auroc" in m:
        pro = f"   PRO (FPR <= 0.3) {m['test/pro']:.4f}" if "test/pro" in m else ""
        lines.append(f"  pixel AUROC {m['test/pixel_auroc']:.4f}{pro}")
    anomalous_share = None
    if cfg.dataset.name == "fashion_mnist":
        anomalous_share = 1 - len(normal or [0]) / 10
    if anomalous_share and anomalous_share > 0.7:
        lines.append(f"  note: {anomalous_share:.0%} of test images are anomalous, so calling everything anomalous already "
                     "scores high F1/ACC; compare AUROC/AP first")
    lines += [
        f"  speed train {m['train/throughput']:,.0f} img/s   test {m['test/throughput']:,.0f} img/s   "
        f"peak memory {m['sys/peak_memory_mb']:,.0f} MiB   ({m['train/seconds']:.1f} s training)",
        *([phase_line(result.info["phases"], result.info.get("before_run"))] if result.info.get("phases") else []),
        f"  run dir  {result.output_dir}",
        f"  MLflow   {result.tracking_uri}   experiment '{cfg.tracking.experiment}'   run {result.run_id}",
    ]
    from freqexp.tracking import ui_command, ui_link

    if not result.tracking_uri.startswith(("http://", "https://")):  # a server already has its UI
        lines.append(f"  open UI  {ui_command(result.tracking_uri)}")
    if result.info.get("experiment_id") is not None:
        lines.append(f"  runs     {ui_link(result.tracking_uri, result.info['experiment_id'])}")
    return "\n".join(lines)


def phase_line(phases: Dict[str, float], before: Optional[float] = None) -> str:
    """`  time   fit 8.0 s + 1.2 s besides (data 0.3, store 0.2, ...); 5.1 s before the run (...)`:
    where the run's time went, and the process's time before it where known (a single run)."""
    other = {k: v for k, v in phases.items() if k != "fit"}
    parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(other.items(), key=lambda kv: -kv[1]))
    line = f"  time     fit {phases.get('fit', 0.0):.1f} s + {sum(other.values()):.1f} s besides ({parts})"
    if before is not None:
        line += f"; {before:.1f} s before the run (Python, importing torch and Lightning, the command line and config)"
    return line


def write_status(output_dir: Path, **fields) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / STATUS_FILE).write_text(json.dumps(fields, indent=2, default=str))


def objective_value(cfg: DictConfig, metrics: Dict[str, float]):
    """sweep.objective: one value, or a tuple for a multi-objective sweeper."""
    values = tuple(float(metrics[k]) if k in metrics else None for k in objectives(cfg))
    return values[0] if len(values) == 1 else values


def task(cfg: DictConfig):
    """The Hydra task: returns the sweep objective (sweep.objective, val/auroc by default; a tuple
    for several), or None for a failed sweep job:
    Optuna (5.x) refuses NaN, and hydra-optuna-sweeper records a trial whose return value is not
    a number as FAILED and goes on (with max_failure_rate: 1.0, as in sweeps/optuna.yaml)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from freqexp.timing import mark

    mark("task")
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    output_dir = Path(hc.runtime.output_dir)
    overrides = hc.job.override_dirname or "default"
    tags = {"overrides": " ".join(hc.overrides.task), "mode": "multirun" if multirun else "run"}
    if multirun:
        sweep_dir = Path(hc.sweep.dir)
        tags.update({"sweep_id": f"{sweep_dir.parent.name}/{sweep_dir.name}", "sweep_dir": str(sweep_dir.resolve()), "job_num": str(hc.job.num)})
    if not multirun:
        try:
            pruning.check(cfg, optuna_sweep=False)
        except FreqexpError as e:
            print(f"freqexp: error: {e}", file=sys.stderr)
            sys.exit(2)
    try:
        try:
            result = execute(cfg, output_dir, run_name=run_label(cfg, list(hc.overrides.task)), tags=tags,
                             resume=multirun and bool(cfg.sweep.resume))
        except Exception as e:
            if not pruning.is_pruned(e):
                raise
            epoch = getattr(e, "pruned_epoch", None)
            write_status(output_dir, status="pruned", overrides=overrides, epoch=epoch)
            log.info("job %s (%s) pruned after epoch %s", hc.job.num, overrides, epoch)
            return pruning.Pruned(epoch, None)
    except FreqexpError as e:
        message = one_line(e)
        write_status(output_dir, status="failed", overrides=overrides, error=message)
        if not multirun:
            print(f"freqexp: error: {message}", file=sys.stderr)
            sys.exit(2)
        log.error("job %s (%s) failed: %s", hc.job.num, overrides, message)
        return None
    except Exception as e:
        message = one_line(e)
        write_status(output_dir, status="failed", overrides=overrides, error=message)
        if not multirun:
            where = f"\n  traceback: {output_dir / 'error.txt'}" if (output_dir / "error.txt").exists() else ""
            print(f"freqexp: error: {message}{where}", file=sys.stderr)
            sys.exit(1)
        log.error("job %s (%s) failed: %s (traceback in %s)", hc.job.num, overrides, message, output_dir / "error.txt")
        return None
    value = objective_value(cfg, result.metrics)
    reported = {"test_auroc": result.metrics.get("test/auroc")}  # shown beside the objective, never optimized
    if result.skipped:
        write_status(output_dir, status="skipped", overrides=overrides, run_id=result.run_id, objective=value, **reported)
        log.info("job %s (%s) skipped: this config already finished as run %s (sweep.resume=false reruns it)", hc.job.num, overrides, result.run_id)
        return value
    write_status(output_dir, status="finished", overrides=overrides, run_id=result.run_id, objective=value, **reported)
    if multirun:
        log.info("job %s (%s) finished: val/auroc %.4f test/auroc %.4f", hc.job.num, overrides,
                 result.metrics.get("val/auroc", float("nan")), result.metrics["test/auroc"])
    else:
        print(summary(cfg, result))
    return value

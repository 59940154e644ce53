"""freqexp's Optuna sweeper: hydra-optuna-sweeper's search-space syntax and settings, plus what a
search of trainings needs and that sweeper cannot give (its trial never reaches the job):

- pruning: each trial reports its objective every validation epoch; Optuna's pruner
  (`sweep.pruner.name`: none | median | successive_halving | hyperband) stops losers early. A
  pruned trial ends PRUNED in the study and KILLED with tag `pruned=true` in MLflow.
- asynchronous trials: `sweep.workers` trials in flight, a new one asked for as soon as any ends
  (no batch barrier). More machines join by running the same command on the same storage.
- GPUs kept busy: each trial pinned to one device, `sweep.jobs_per_device` at once per device.
- no orphans: trials in flight send a heartbeat to the study's storage (RDB storages); a trial
  whose sweep was killed hard is marked FAIL when the next sweep opens the study.

Presets: sweeps/optuna.yaml, optuna_pruned.yaml, optuna_multi.yaml; the Hydra plugin class is
hydra_plugins.freqexp_launch.FreqexpOptunaSweeper (Hydra loads plugins from that package only)."""
from __future__ import annotations

import functools
import logging
import sys
import threading
from typing import Any, List, Optional

from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import DictConfig, OmegaConf

from freqexp.multirun import pruning
from freqexp.errors import ConfigError

log = logging.getLogger("freqexp")


def open_storage(url: Any, heartbeat: int):
    """The study's storage: an RDB storage with a heartbeat (stale RUNNING trials can be failed)
    and a patient sqlite connection (several processes write one file); None stays in memory."""
    if url is None:
        return None
    import optuna

    if not isinstance(url, str):
        return url
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                                      grace_period=2 * heartbeat)


class Heartbeat(threading.Thread):
    """Records a heartbeat for every trial in flight, every `interval` seconds."""

    def __init__(self, storage, interval: int):
        super().__init__(daemon=True, name="freqexp-heartbeat")
        self.storage, self.interval = storage, interval
        self.trials: set[int] = set()
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def add(self, trial_id: int) -> None:
        with self.lock:
            self.trials.add(trial_id)
        self.storage.record_heartbeat(trial_id)

    def remove(self, trial_id: int) -> None:
        with self.lock:
            self.trials.discard(trial_id)

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            with self.lock:
                ids = list(self.trials)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as e:  # noqa: BLE001 - a missed beat is retried; the trial goes on
                    log.debug("heartbeat of trial %s failed: %s", trial_id, e)


def fail(message: str) -> None:
    print(f"freqexp: error: {message}", file=sys.stderr)
    sys.exit(2)


class FreqexpOptunaSweeperImpl(OptunaSweeperImpl):
    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.job_idx = 0
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        self.sweep_dir = config.hydra.sweep.dir

    def space(self, arguments: List[str]):
        import optuna

        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config() + list(arguments)
        distributions, fixed = create_params_from_overrides(params_conf)
        space = dict(self.search_space_distributions or {})
        space.update(distributions)
        if isinstance(self.sampler, functools.partial) and self.sampler.func == optuna.samplers.GridSampler:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in space.items()}
            self.sampler = self.sampler(grid)
            size = 1
            for values in grid.values():
                size *= len(values)
            self.n_trials = min(self.n_trials, size)
        for name in fixed:
            space.pop(name, None)
        return space, fixed

    def sweep(self, arguments: List[str]) -> None:
        import warnings

        import optuna

        # Optuna warns that heartbeats are meant for Study.optimize (we ask and tell, and beat for
        # the trials in flight ourselves), and hydra-optuna-sweeper builds the deprecated
        # (Log)UniformDistribution that Optuna converts: nothing a user can act on
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        warnings.filterwarnings("ignore", message=r".*UniformDistribution has been deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"fail_stale_trials is experimental")

        from freqexp.multirun.parallel import DeviceSlots, JobPool, plan_workers
        from freqexp.validate import check_searchable

        cfg = self.config
        sweep_opts = cfg.get("sweep") or {}
        try:
            pruning.check(cfg, optuna_sweep=True)
            check_searchable(cfg)
            workers, gpus, per_device = plan_workers(cfg)
        except ConfigError as e:
            fail(str(e))
        if self.n_jobs > 1 and sweep_opts.get("workers", 1) == 1:
            workers = self.n_jobs  # hydra.sweeper.n_jobs, as before, now without a batch barrier
        if workers > 1 and not isinstance(self.storage, str):
            fail("sweep.workers: trials in other processes share the study through its storage; "
                 "set hydra.sweeper.storage (e.g. sqlite:///outputs/optuna.db)")
        heartbeat = sweep_opts.get("heartbeat", 30)
        if isinstance(heartbeat, bool) or not isinstance(heartbeat, int) or heartbeat < 1:
            fail(f"sweep.heartbeat: must be an integer >= 1 (seconds); got {heartbeat!r}")
        space, fixed = self.space(arguments)
        directions = self._get_directions()
        max_epochs = int(cfg.trainer.max_epochs)
        pruner_cfg = OmegaConf.to_container(sweep_opts.get("pruner"), resolve=True) if OmegaConf.is_config(sweep_opts.get("pruner")) \
            else sweep_opts.get("pruner")
        pruner = pruning.build(pruner_cfg, max_epochs)
        storage = open_storage(self.storage, heartbeat)
        study = optuna.create_study(study_name=self.study_name, storage=storage, sampler=self.sampler, directions=directions,
                                    load_if_exists=True, pruner=pruner)
        if storage is not None:
            running = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
            optuna.storages.fail_stale_trials(study)
            stale = running - {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
            if stale:
                log.warning("study %s: %d trial(s) left RUNNING by a worker that stopped sending heartbeats are now FAIL "
                            "(trial %s)", study.study_name, len(stale), ", ".join(map(str, sorted(stale))))
        log.info("study %s (%s), sampler %s, pruner %s, %d trial(s), %d in flight at once", study.study_name,
                 self.storage or "in memory", type(study.sampler).__name__, pruning.name_of(pruner_cfg), self.n_trials, workers)

        beat = Heartbeat(storage, heartbeat) if storage is not None else None
        if beat:
            beat.start()
        pool = JobPool(workers, DeviceSlots(gpus, per_device), self.hydra_context, cfg, self.task_function)
        counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}

        def tell(trial, result) -> None:
            if beat:
                beat.remove(trial._trial_id)
            state, values = optuna.trial.TrialState.FAIL, None
            try:
                value = result.return_value if not isinstance(result, BaseException) else None
            except BaseException:  # noqa: BLE001 - the job raised: FAIL
                value = None
            if isinstance(value, pruning.Pruned):
                state = optuna.trial.TrialState.PRUNED
            elif value is not None:
                try:
                    values = [float(v) for v in (value if len(directions) > 1 else [value])]
                    state = optuna.trial.TrialState.COMPLETE
                except (TypeError, ValueError):
                    log.warning("trial %d returned %r, not %d number(s): FAIL", trial.number, value, len(directions))
            if state == optuna.trial.TrialState.COMPLETE and any(v != v for v in values):
                state, values = optuna.trial.TrialState.FAIL, None  # Optuna refuses NaN
            try:
                study.tell(trial, values=values, state=state)
            except Exception as e:  # noqa: BLE001 - e.g. a grid sampler that is already exhausted
                log.warning("could not tell trial %d: %s", trial.number, e)
            counts[state.name] += 1

        asked = 0
        try:
            while asked < self.n_trials or pool.inflight:
                if asked < self.n_trials and (pool.workers == 1 or len(pool.inflight) < pool.workers):
                    trial = study.ask()
                    asked += 1
                    if beat:
                        beat.add(trial._trial_id)
                    overrides = self._configure_trials([trial], space, fixed)[0]
                    idx, self.job_idx = self.job_idx, self.job_idx + 1
                    if pool.workers == 1:
                        tell(trial, pool.run_here(idx, overrides, trial=trial))
                    else:
                        pool.submit(idx, overrides, key=trial,
                                    trial=(self.storage, study.study_name, trial._trial_id, pruner_cfg, max_epochs))
                for trial, result in pool.finished(block=asked >= self.n_trials or len(pool.inflight) >= pool.workers):
                    tell(trial, result)
        finally:
            pool.close()
            if beat:
                beat.stop.set()
        log.info("study %s: %d complete, %d pruned, %d failed in this sweep", study.study_name, counts["COMPLETE"],
                 counts["PRUNED"], counts["FAIL"])
        failures = counts["FAIL"] / max(asked, 1)
        if failures > self.max_failure_rate:
            log.error("%d of %d trials failed (max_failure_rate %s)", counts["FAIL"], asked, self.max_failure_rate)
        self.save_results(study, directions)

    def save_results(self, study, directions) -> None:
        import optuna

        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not complete:
            return
        if len(directions) < 2:
            best = study.best_trial
            results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
            log.info("Best parameters: %s", best.params)
            log.info("Best value: %s", best.value)
        else:
            results = {"name": "optuna", "solutions": [{"params": t.params, "values": t.values} for t in study.best_trials]}
            log.info("Number of Pareto solutions: %d", len(study.best_trials))
            for t in study.best_trials:
                log.info("    Values: %s, Params: %s", t.values, t.params)
        OmegaConf.save(OmegaConf.create(results), f"{self.config.hydra.sweep.dir}/optimization_results.yaml")

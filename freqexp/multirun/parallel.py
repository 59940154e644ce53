"""Jobs in flight at once: a pool of worker processes, each job pinned to one GPU.

`sweep.workers` jobs run at the same time (`auto`: GPUs x `sweep.jobs_per_device` on a GPU
machine, else 1); a new job starts as soon as any one ends. On a GPU machine each job gets one
device (`hardware.device_index`), at most `sweep.jobs_per_device` jobs on a device at once (small
28 px models leave a large GPU idle, so several can share it). With one worker, jobs run in this
process, one after another, as Hydra's basic launcher runs them.

Used by the freqexp Optuna sweeper (asynchronous trials) and by the `parallel` launcher (grids):
`python -m freqexp -m model=ae,cae,cvae sweep.workers=3` (the default launcher; its Hydra plugin
class is hydra_plugins.freqexp_launch.ParallelLauncher)."""
from __future__ import annotations

import logging
import os
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from omegaconf import DictConfig, open_dict

from hydra.plugins.launcher import Launcher

from freqexp.errors import ConfigError

log = logging.getLogger("freqexp")


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def uses_gpu(config: DictConfig, n_gpus: int) -> bool:
    accelerator = str(config.get("hardware", {}).get("accelerator", "auto"))
    return n_gpus > 0 and accelerator in ("auto", "gpu", "cuda")


def plan_workers(config: DictConfig, n_gpus: Optional[int] = None) -> tuple[int, int, int]:
    """(workers, gpus used, jobs per device) from sweep.workers / sweep.jobs_per_device; bad values
    are a ConfigError naming the key."""
    sweep = config.get("sweep") or {}
    per_device = sweep.get("jobs_per_device", 1)
    if isinstance(per_device, bool) or not isinstance(per_device, int) or per_device < 1:
        raise ConfigError("sweep.jobs_per_device", f"must be an integer >= 1; got {per_device!r}")
    workers = sweep.get("workers", 1)
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError("sweep.workers", f"must be auto or an integer >= 1 (jobs in flight at once); got {workers!r}")
    n_gpus = visible_gpus() if n_gpus is None else n_gpus
    gpus = n_gpus if uses_gpu(config, n_gpus) else 0
    if workers == "auto":
        workers = gpus * per_device if gpus else 1
    return workers, gpus, per_device


@dataclass
class DeviceSlots:
    """Which GPU the next job runs on: the least-loaded device with fewer than `per_device` jobs
    (lowest index first). No GPUs: every job gets None (the job's own hardware choice)."""
    n_gpus: int
    per_device: int = 1
    load: List[int] = field(default_factory=list)

    def __post_init__(self):
        self.load = [0] * self.n_gpus

    def acquire(self) -> Optional[int]:
        if not self.n_gpus:
            return None
        device = min(range(self.n_gpus), key=lambda d: (self.load[d], d))
        if self.load[device] >= self.per_device:
            raise RuntimeError("more jobs in flight than device slots")  # the pool never lets this happen
        self.load[device] += 1
        return device

    def release(self, device: Optional[int]) -> None:
        if device is not None:
            self.load[device] -= 1

    @property
    def capacity(self) -> Optional[int]:
        return self.n_gpus * self.per_device if self.n_gpus else None


def with_device(overrides: Sequence[str], device: Optional[int]) -> List[str]:
    out = [o for o in overrides if not o.lstrip("+~").startswith("hardware.device_index=")]
    return out + ([f"hardware.device_index={device}"] if device is not None else [])


class ComposedConfigs:
    """A sweep's config loader that composes each job's config once. Hydra's basic sweeper
    composes every job's config to check the batch before launching any (validate_batch_is_legal);
    the launcher then composed each again to run it. Wrapped around the sweep's loader, the
    first composition is kept (up to LIMIT configs) and `take` hands it to the launcher; a job
    whose overrides changed since (a GPU job gains hardware.device_index) is composed anew. A
    worker process receives the plain loader (pickling drops what is kept)."""

    LIMIT = 512

    def __init__(self, loader):
        self.loader = loader
        self.kept: Dict[tuple, tuple] = {}

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: List[str]):
        composed = self.loader.load_sweep_config(master_config, sweep_overrides)
        if len(self.kept) < self.LIMIT:
            self.kept[tuple(sweep_overrides)] = (master_config, composed)
        return composed

    def take(self, master_config: DictConfig, sweep_overrides: Sequence[str]):
        """The config composed for these overrides (removed from what is kept), or None."""
        master, composed = self.kept.pop(tuple(sweep_overrides), (None, None))
        return composed if master is master_config else None

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __reduce__(self):
        return _plain_loader, (self.loader,)


def _plain_loader(loader):
    return loader


def compose_job(hydra_context, config: DictConfig, overrides: Sequence[str]):
    """A job's config composed now, by the plain loader: never kept (only the sweeper's batch
    check fills ComposedConfigs, and each kept config runs one job)."""
    loader = hydra_context.config_loader
    loader = loader.loader if isinstance(loader, ComposedConfigs) else loader
    return loader.load_sweep_config(config, list(overrides))


def checked_config(hydra_context, config: DictConfig, overrides: Sequence[str], device: Optional[int]):
    """The config composed for this job when its batch was checked (taken: it runs this job
    only), or None: nothing kept, or a GPU job, whose overrides gain hardware.device_index and
    which is composed anew (its checked copy is dropped all the same)."""
    loader = hydra_context.config_loader
    composed = loader.take(config, overrides) if isinstance(loader, ComposedConfigs) else None
    return composed if device is None else None


def execute_job(idx: int, overrides: Sequence[str], hydra_context, config: DictConfig, task_function: Callable,
                singleton_state: Optional[Dict[Any, Any]] = None, trial: Any = None, composed: Optional[DictConfig] = None,
                threads: Optional[int] = None):
    """One job, as Hydra's launchers run one (in a worker process: with the parent's singleton
    state), with the Optuna trial it belongs to attached for pruning. `composed`: the job's
    config when the parent has it already. A worker process runs job after job: its imports,
    CUDA context and decoded datasets serve them all. `threads`: the worker's share of the CPU
    cores, so that workers in flight together do not oversubscribe them."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.singleton import Singleton
    from hydra.core.utils import configure_log, run_job, setup_globals

    from freqexp.multirun import pruning

    if threads is not None:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    setup_globals()
    if singleton_state is not None:
        Singleton.set_state(singleton_state)
    sweep_config = composed if composed is not None else compose_job(hydra_context, config, overrides)
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    HydraConfig.instance().set_config(sweep_config)
    pruning.attach(trial)
    try:
        return run_job(hydra_context=hydra_context, config=sweep_config, task_function=task_function,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    finally:
        pruning.attach(None)
        if singleton_state is None:  # in this process: the sweep's own logging back, as Hydra's basic launcher does
            configure_log(config.hydra.hydra_logging, config.hydra.verbose)


class JobPool:
    """Runs jobs on `workers` processes (loky, as Hydra's joblib launcher does), or in this process
    when workers == 1 (`run_here`). `submit` waits while every slot is busy; `finished` returns
    the jobs that ended, a worker process that died as that job's exception."""

    def __init__(self, workers: int, slots: DeviceSlots, hydra_context, config: DictConfig, task_function: Callable):
        self.workers = workers if slots.capacity is None else min(workers, slots.capacity)
        self.slots = slots
        self.hydra_context, self.config, self.task_function = hydra_context, config, task_function
        self.inflight: Dict[Future, tuple] = {}
        self.ended: List[tuple] = []
        self.executor = None
        self.threads = max(1, (os.cpu_count() or 1) // self.workers)  # each worker's share of the cores
        if self.workers > 1:
            from joblib.externals.loky import get_reusable_executor

            self.executor = get_reusable_executor(max_workers=self.workers, reuse=False)

    def run_here(self, idx: int, overrides: Sequence[str], trial: Any = None):
        device = self.slots.acquire()
        try:
            return execute_job(idx, with_device(overrides, device), self.hydra_context, self.config, self.task_function, None, trial,
                               checked_config(self.hydra_context, self.config, overrides, device))
        finally:
            self.slots.release(device)

    def submit(self, idx: int, overrides: Sequence[str], key: Any = None, trial: Any = None) -> None:
        from hydra.core.singleton import Singleton

        while len(self.inflight) >= self.workers:
            self._wait_one()
        device = self.slots.acquire()
        composed = checked_config(self.hydra_context, self.config, overrides, device)
        future = self.executor.submit(execute_job, idx, with_device(overrides, device), self.hydra_context, self.config,
                                      self.task_function, Singleton.get_state(), trial, composed, self.threads)
        self.inflight[future] = (key, device)

    def _wait_one(self) -> None:
        done, _ = wait(list(self.inflight), return_when=FIRST_COMPLETED)
        for future in done:
            key, device = self.inflight.pop(future)
            self.slots.release(device)
            self.ended.append((key, future))

    def finished(self, block: bool = False) -> list:
        """(key, JobReturn or exception) of the jobs that ended since the last call; with block,
        waits for one when none has ended and some are in flight."""
        if block and not self.ended and self.inflight:
            self._wait_one()
        out = []
        for key, future in self.ended:
            try:
                out.append((key, future.result()))
            except BaseException as e:  # noqa: BLE001 - a worker that died (OOM, kill -9) fails that job only
                out.append((key, e))
        self.ended = []
        return out

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)


def pool_for(config: DictConfig, hydra_context, task_function: Callable) -> JobPool:
    workers, gpus, per_device = plan_workers(config)
    if gpus:
        log.info("jobs on %d GPU(s), %d at a time per device, %d in flight", gpus, per_device, min(workers, gpus * per_device))
    elif workers > 1:
        log.info("%d jobs in flight at once", workers)
    return JobPool(workers, DeviceSlots(gpus, per_device), hydra_context, config, task_function)


class ParallelLauncher(Launcher):
    """Hydra launcher (hydra/launcher=parallel, the default): the jobs of a grid on `sweep.workers`
    processes, each pinned to a GPU when there are GPUs; one worker runs them in this process."""

    def __init__(self, **_: Any) -> None:
        super().__init__()
        self.config: Optional[DictConfig] = None
        self.hydra_context = None
        self.task_function = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        if not isinstance(hydra_context.config_loader, ComposedConfigs):  # shared with the sweeper, which checks batches with it
            hydra_context.config_loader = ComposedConfigs(hydra_context.config_loader)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        from hydra.core.utils import configure_log

        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = self.config.hydra.sweep.dir
        os.makedirs(str(sweep_dir), exist_ok=True)
        log.info("Launching %d jobs locally", len(job_overrides))
        pool = pool_for(self.config, self.hydra_context, self.task_function)
        results: Dict[int, Any] = {}
        try:
            for i, overrides in enumerate(job_overrides):
                idx = initial_job_idx + i
                log.info("\t#%d : %s", idx, " ".join(overrides))
                if pool.workers == 1:
                    results[i] = pool.run_here(idx, overrides)
                else:
                    pool.submit(idx, overrides, key=i)
                    results.update(pool.finished())
            while pool.inflight:
                results.update(pool.finished(block=True))
        finally:
            pool.close()
        returns = []
        for i in range(len(job_overrides)):
            result = results[i]
            if isinstance(result, BaseException):  # the worker process died: this job failed, the rest stand
                log.error("job %d (%s) failed: its worker process died (%s)", initial_job_idx + i, " ".join(job_overrides[i]),
                          type(result).__name__)
                returns.append(failed_return(job_overrides[i], result))
            else:
                returns.append(result)
        return returns


def failed_return(overrides: Sequence[str], error: BaseException):
    from hydra.core.utils import JobReturn, JobStatus

    ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
    ret._return_value = error
    return ret

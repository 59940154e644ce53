"""freqexp's sweeper and launcher as Hydra plugins (Hydra instantiates plugins from the
`hydra_plugins` package only). The work is in freqexp.multirun.optuna_sweeper and freqexp.multirun.parallel; the
sweeper's import is deferred, so composing a config never pays for Optuna."""
from typing import Any, List, Optional

from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig

from freqexp.multirun.parallel import ParallelLauncher as _ParallelLauncher


class ParallelLauncher(_ParallelLauncher):
    """hydra/launcher=parallel (the default): see freqexp.multirun.parallel."""


class FreqexpOptunaSweeper(Sweeper):
    """hydra.sweeper._target_ of freqexp's Optuna presets: hydra-optuna-sweeper's settings, plus
    pruning, asynchronous workers and heartbeats (see freqexp.multirun.optuna_sweeper)."""

    def __init__(self, sampler: Any, direction: Any, storage: Optional[Any], study_name: Optional[str], n_trials: int,
                 n_jobs: int, max_failure_rate: float, search_space: Optional[DictConfig], custom_search_space: Optional[str],
                 params: Optional[DictConfig]) -> None:
        from freqexp.multirun.optuna_sweeper import FreqexpOptunaSweeperImpl

        self.sweeper = FreqexpOptunaSweeperImpl(sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate,
                                                search_space, custom_search_space, params)

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> None:
        return self.sweeper.sweep(arguments)

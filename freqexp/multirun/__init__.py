"""The multirun side: what runs many jobs and what a sweep leaves behind.

  parallel        the job pool and GPU slots; the default launcher (hydra/launcher=parallel)
  optuna_sweeper  freqexp's Optuna sweeper: asynchronous trials, heartbeats, pruned trials
  pruning         Optuna's pruners, fed each validated epoch's objective by the job
  orphans         runs left RUNNING by a process killed hard, marked KILLED
  sweep           the sweep summary: a Hydra callback run when a --multirun starts and ends
  figures         a run's figures: saved as data by each job, drawn for a sweep's best runs

What a sweep optimizes (sweep.objective) and the figure settings are in freqexp.objective, below
this package, so that validation and a single run read them without importing it."""

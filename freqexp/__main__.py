"""`python -m freqexp` / `freqexp`: the Hydra entry point, nothing else (the command line's
overrides are checked first, so a typo is one line with a "did you mean")."""
import sys

import hydra
from omegaconf import DictConfig

import freqexp  # noqa: F401  (registers the loss config source)


@hydra.main(version_base="1.3", config_path="pkg://freqexp.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    return start_run(cfg)


def start_run(cfg: DictConfig) -> float:
    from omegaconf import OmegaConf

    from freqexp.data import prefetch

    dataset = OmegaConf.select(cfg, "dataset", throw_on_resolution_failure=False)  # None: the run's validation says why
    if dataset is not None:
        prefetch(dataset)  # the data is decompressed in a thread while freqexp.run imports Lightning
    from freqexp.run import task

    return task(cfg)


def main() -> None:
    import warnings

    from freqexp.timing import mark

    mark("main")  # the interpreter is up and the entry point's imports are done
    from freqexp.overrides import check

    # hydra-optuna-sweeper's TPE config passes every TPESampler argument, four of which Optuna 4.9+
    # deprecates; the defaults it passes are Optuna's own, so the warning says nothing to act on
    warnings.filterwarnings("ignore", message=r"`\w+` has been deprecated in v4\.9\.0", category=FutureWarning)

    problem = check(sys.argv[1:])
    if problem:
        print(f"freqexp: error: {problem}", file=sys.stderr)
        sys.exit(2)
    from freqexp import store_process

    if store_process.wanted(sys.argv[1:]):
        store_process.start()  # MLflow is imported there while this process imports torch and Lightning
    try:
        hydra_main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    exit_now(code)


def exit_now(code: int) -> None:
    """End the process without the interpreter's teardown: with torch, Lightning and MLflow loaded,
    finalizing every module takes seconds (1.8 s on 2 CPU cores) after all the work is done. Every
    run has ended its MLflow run and written its files by now; the logs and streams are flushed here.
    Under a profiler or a tracer (cProfile, coverage), which write their results at exit, the
    process ends normally."""
    import logging
    import os

    from freqexp import store_process

    store_process.discard()  # one no run claimed: the run failed before opening the store
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    main()

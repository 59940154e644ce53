"""`python -m freqexp` / `freqexp`: the Hydra entry point, nothing else (the command line's
overrides are checked first, so a typo is one line with a "did you mean")."""
import sys

import hydra
from omegaconf import DictConfig

import freqexp  # noqa: F401  (registers the loss config source)


@hydra.main(version_base="1.3", config_path="pkg://freqexp.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    from freqexp.run import task

    return task(cfg)


def main() -> None:
    import warnings

    from freqexp.overrides import check

    # hydra-optuna-sweeper's TPE config passes every TPESampler argument, four of which Optuna 4.9+
    # deprecates; the defaults it passes are Optuna's own, so the warning says nothing to act on
    warnings.filterwarnings("ignore", message=r"`\w+` has been deprecated in v4\.9\.0", category=FutureWarning)

    problem = check(sys.argv[1:])
    if problem:
        print(f"freqexp: error: {problem}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


if __name__ == "__main__":
    main()

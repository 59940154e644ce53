"""`python -m freqexp` / `freqexp`: the Hydra entry point, nothing else."""
import hydra
from omegaconf import DictConfig

import freqexp  # noqa: F401  (registers the loss config source)


@hydra.main(version_base="1.3", config_path="pkg://freqexp.conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from freqexp.run import task

    return task(cfg)


if __name__ == "__main__":
    main()

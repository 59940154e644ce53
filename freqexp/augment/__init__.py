"""Training-time augmentations, batched on the training device. An augment maps a clean batch
x to (model input, loss target). The CutPaste family also `synthesize`s pseudo-anomalies with
pixel masks (for dataset.val_anomalies=pseudo and for models that learn to repair them), as does
perlin (DRAEM's Perlin-noise masks filled with textures), and flip_rot `expand`s the training set
xN once before training."""
from freqexp.augment.base import AUGMENTS, build_augment
from freqexp.augment import cutpaste, geometric, perlin  # noqa: F401  (registration)

__all__ = ["AUGMENTS", "build_augment"]

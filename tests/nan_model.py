"""A model whose reconstructions are NaN: a real failing job for the failure-isolation tests,
plugged in the way users add their own models (model.name=module:Class)."""
from freqexp.models.autoencoders import CAE


class NaNCAE(CAE):
    def forward(self, x):
        out = super().forward(x)
        out["recon"] = out["recon"] * float("nan")
        return out

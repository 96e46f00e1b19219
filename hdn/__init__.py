"""hdn: exact, fast SSI and Hierarchical Depth Normalization (HDN) losses for PyTorch.

Functional API plus thin ``nn.Module`` wrappers::

    import hdn
    loss = hdn.hdn_loss(pred, target, mask, context="dr", levels=3)
"""

from hdn import alignment, contexts, data, metrics
from hdn.alignment import align_least_squares, compute_scale_and_shift
from hdn.losses import (
    GradientMatchingLoss,
    HDNLoss,
    SSILoss,
    contexts_loss,
    gradient_matching_loss,
    hdn_loss,
    ssi_loss,
)
from hdn.normalization import context_normalize, ssi_normalize

__version__ = "0.1.0"

__all__ = [
    "GradientMatchingLoss",
    "HDNLoss",
    "SSILoss",
    "align_least_squares",
    "alignment",
    "compute_scale_and_shift",
    "context_normalize",
    "contexts",
    "contexts_loss",
    "data",
    "gradient_matching_loss",
    "hdn_loss",
    "metrics",
    "ssi_loss",
    "ssi_normalize",
]

"""Diagnostics of gradient-estimate quality, for logging during training."""

from ._diagnostics import (
    cosine_similarity as cosine_similarity,
    estimator_moments as estimator_moments,
)

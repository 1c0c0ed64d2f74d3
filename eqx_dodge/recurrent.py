"""Recurrent models: online DODGE and the candidate directions of the DODGE paper's
recurrent experiments (truncated BPTT, synthetic gradients and their critics).

`OnlineDodge` and `OnlineDodgeState` are also available at the top level.
"""

from ._candidates import (
    critic_loss as critic_loss,
    LinearCritic as LinearCritic,
    QuadraticCritic as QuadraticCritic,
    synthetic_gradient_candidate as synthetic_gradient_candidate,
    tbptt_candidate as tbptt_candidate,
)
from ._online import OnlineDodge as OnlineDodge, OnlineDodgeState as OnlineDodgeState

"""eqx_dodge: directional gradient descent (DODGE) for Equinox and Optax."""

import importlib.metadata as _metadata

from . import diagnostics as diagnostics, recurrent as recurrent
from ._activity import (
    activity_dodge as activity_dodge,
    activity_value_and_dodge as activity_value_and_dodge,
)
from ._activity_points import ActivityPoint as ActivityPoint
from ._activity_transform import (
    dodge_activity as dodge_activity,
    DodgeActivityState as DodgeActivityState,
)
from ._adam import (
    adam_dodge as adam_dodge,
    scale_by_adam_dodge as scale_by_adam_dodge,
    ScaleByAdamDodgeState as ScaleByAdamDodgeState,
)
from ._curvature import (
    curvature_aware_dodge as curvature_aware_dodge,
    CurvatureAwareDodgeState as CurvatureAwareDodgeState,
)
from ._directions import (
    partition_direction as partition_direction,
    random_direction as random_direction,
)
from ._filter import (
    filter_dodge as filter_dodge,
    filter_value_and_dodge as filter_value_and_dodge,
)
from ._guesses import (
    activation_guess as activation_guess,
    layer_activation_guess as layer_activation_guess,
    transpose_guess as transpose_guess,
)
from ._local_losses import (
    local_guess_dodge as local_guess_dodge,
    local_loss as local_loss,
    LocalLosses as LocalLosses,
)
from ._online import (
    OnlineDodge as OnlineDodge,
    OnlineDodgeState as OnlineDodgeState,
)
from ._sharded import (
    sharded_dodge as sharded_dodge,
    sharded_value_and_dodge as sharded_value_and_dodge,
)
from ._sources import (
    dodge_ema as dodge_ema,
    dodge_random as dodge_random,
    dodge_updates as dodge_updates,
    DodgeEmaState as DodgeEmaState,
    DodgeRandomState as DodgeRandomState,
    DodgeUpdatesState as DodgeUpdatesState,
)
from ._transform import dodge as dodge


try:
    __version__ = _metadata.version("eqx_dodge")
except _metadata.PackageNotFoundError:  # a source tree on `PYTHONPATH`, not installed
    __version__ = "unknown"

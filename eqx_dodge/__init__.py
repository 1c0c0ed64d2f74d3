"""eqx_dodge: directional gradient descent (DODGE) for Equinox and Optax."""

import importlib.metadata

from ._directions import (
    partition_direction as partition_direction,
    random_direction as random_direction,
)
from ._filter import (
    filter_dodge as filter_dodge,
    filter_value_and_dodge as filter_value_and_dodge,
)
from ._online import (
    OnlineDodge as OnlineDodge,
    OnlineDodgeState as OnlineDodgeState,
    tbptt_candidate as tbptt_candidate,
)


__version__ = importlib.metadata.version("eqx_dodge")

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
from ._sharded import (
    sharded_dodge as sharded_dodge,
    sharded_value_and_dodge as sharded_value_and_dodge,
)


__version__ = importlib.metadata.version("eqx_dodge")

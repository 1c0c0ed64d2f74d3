"""eqx_dodge: directional gradient descent (DODGE) for Equinox and Optax."""

import importlib.metadata

from . import diagnostics as diagnostics
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


__version__ = importlib.metadata.version("eqx_dodge")

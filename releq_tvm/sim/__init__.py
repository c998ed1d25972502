"""sim stage: the Stripes bit-serial accelerator, stepped cycle by cycle, and its closed form.

The search calls :func:`stripes_cost_ratio` in its reward loop; reports use
:class:`StripesSimulator`; ``releq-tvm simulate`` (``releq_tvm.sim.cli``) prints the per-layer
table. Importing this package does not import torch.
"""

from releq_tvm.sim.config import ENERGY_CONSTANTS, MODES, STRIPES_CONSTANTS, Constant, StripesConfig
from releq_tvm.sim.stripes import (
    EnergyParts,
    LayerCost,
    LayerCounts,
    LayerMapping,
    LayerResult,
    SimResult,
    StripesSimulator,
    clear_cache,
    closed_form_counts,
    closed_form_cycles,
    map_layer,
    stepped_counts,
    stripes_cost_ratio,
)

__all__ = [
    "ENERGY_CONSTANTS",
    "MODES",
    "STRIPES_CONSTANTS",
    "Constant",
    "EnergyParts",
    "LayerCost",
    "LayerCounts",
    "LayerMapping",
    "LayerResult",
    "SimResult",
    "StripesConfig",
    "StripesSimulator",
    "clear_cache",
    "closed_form_counts",
    "closed_form_cycles",
    "map_layer",
    "stepped_counts",
    "stripes_cost_ratio",
]

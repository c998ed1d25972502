"""Networks: torch models, their traced weight-layer tables and the published bitwidths."""

from releq_tvm.networks.registry import (  # noqa: F401
    LayerSpec,
    MissingCheckpointError,
    NetworkSpec,
    UnknownNetworkError,
    checkpoint_path,
    create_network,
    get_network_spec,
    layer_table,
    list_networks,
    register_network,
    register_user_network,
    total_macs,
    total_weights,
    weight_modules,
)
from releq_tvm.networks import models  # noqa: F401,E402  (registers the nine networks)
from releq_tvm.networks.models import ADMM_BITS  # noqa: F401,E402
from releq_tvm.networks.user_model import ModelSourceError, register_user_model  # noqa: F401,E402

"""Reference architectures and their registry: ``create_model("lenet-300-100")``."""

from neuronmerge.models import lenet as _lenet  # noqa: F401  (registers its architecture)
from neuronmerge.models.lenet import LeNet300100
from neuronmerge.models.registry import (
    ModelSpec,
    available_models,
    create_model,
    get_spec,
    model_from_state_dict,
    register,
)

__all__ = [
    "LeNet300100",
    "ModelSpec",
    "available_models",
    "create_model",
    "get_spec",
    "model_from_state_dict",
    "register",
]

"""Reference architectures and their registry: ``create_model("lenet-300-100")``.

Importing this package registers every architecture below; each can be rebuilt at any per-layer
widths from its weights alone (``model_from_state_dict``), which is how merged models are reloaded.
"""

from neuronmerge.models import alexnet as _alexnet  # noqa: F401  (registers its architecture)
from neuronmerge.models import fmnist as _fmnist  # noqa: F401
from neuronmerge.models import lenet as _lenet  # noqa: F401
from neuronmerge.models import resnet as _resnet  # noqa: F401
from neuronmerge.models import vgg as _vgg  # noqa: F401
from neuronmerge.models import wrn as _wrn  # noqa: F401
from neuronmerge.models.alexnet import AlexNetCifar, alexnet_cifar
from neuronmerge.models.fmnist import AlexNetFmnist, ResNetFmnist, VGGFmnist
from neuronmerge.models.lenet import LeNet300100
from neuronmerge.models.registry import (
    ModelSpec,
    available_models,
    create_model,
    get_spec,
    model_from_state_dict,
    register,
)
from neuronmerge.models.resnet import (
    CifarResNet,
    cifar_resnet,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)
from neuronmerge.models.vgg import VGGCifar, vgg16_cifar, vgg_cifar
from neuronmerge.models.wrn import WideResNet, wide_resnet, wrn_40_4

__all__ = [
    "AlexNetCifar",
    "AlexNetFmnist",
    "CifarResNet",
    "LeNet300100",
    "ResNetFmnist",
    "ModelSpec",
    "VGGCifar",
    "VGGFmnist",
    "WideResNet",
    "alexnet_cifar",
    "available_models",
    "cifar_resnet",
    "create_model",
    "get_spec",
    "model_from_state_dict",
    "register",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "vgg16_cifar",
    "vgg_cifar",
    "wide_resnet",
    "wrn_40_4",
]

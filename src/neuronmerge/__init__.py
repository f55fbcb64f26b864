"""neuronmerge: data-free neuron merging for trained PyTorch networks.

>>> import neuronmerge as nm
>>> small = nm.merge(model, example_inputs=x, ratio=0.5)        # doctest: +SKIP
"""

from neuronmerge.api import (
    DEFAULT_THRESHOLD,
    METHODS,
    Plan,
    Report,
    Result,
    compress,
    merge,
    plan,
    prune,
)
from neuronmerge.errors import (
    CaptureError,
    CheckpointError,
    DatasetNotFoundError,
    InvalidArgumentError,
    NeuronMergeError,
    OutputExistsError,
    UnknownArchitectureError,
)
from neuronmerge.io import load, load_checkpoint, save
from neuronmerge.models import available_models, create_model
from neuronmerge.probes import synthesize_probes
from neuronmerge.recalibrate import recalibrate_batchnorm

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_THRESHOLD",
    "METHODS",
    "CaptureError",
    "CheckpointError",
    "DatasetNotFoundError",
    "InvalidArgumentError",
    "NeuronMergeError",
    "OutputExistsError",
    "Plan",
    "Report",
    "Result",
    "UnknownArchitectureError",
    "available_models",
    "compress",
    "create_model",
    "load",
    "load_checkpoint",
    "merge",
    "plan",
    "prune",
    "recalibrate_batchnorm",
    "save",
    "synthesize_probes",
    "__version__",
]

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
    SiteReport,
    compress,
    merge,
    plan,
    prune,
)
from neuronmerge.errors import (
    CaptureError,
    CheckpointError,
    DatasetCorruptError,
    DatasetNotFoundError,
    InvalidArgumentError,
    MissingDependencyError,
    NeuronMergeError,
    OutputExistsError,
    OutputWriteError,
    UnknownArchitectureError,
)
from neuronmerge.export import OnnxExport, export_onnx
from neuronmerge.io import load, load_checkpoint, save
from neuronmerge.models import available_models, create_model
from neuronmerge.notices import CompressionWarning
from neuronmerge.options import Options
from neuronmerge.planning import LayerRow, Totals
from neuronmerge.probes import synthesize_probes
from neuronmerge.recalibrate import recalibrate_batchnorm
from neuronmerge.types import Group, Skipped

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_THRESHOLD",
    "METHODS",
    "CaptureError",
    "CheckpointError",
    "CompressionWarning",
    "DatasetCorruptError",
    "DatasetNotFoundError",
    "Group",
    "InvalidArgumentError",
    "LayerRow",
    "MissingDependencyError",
    "NeuronMergeError",
    "OnnxExport",
    "Options",
    "OutputExistsError",
    "OutputWriteError",
    "Plan",
    "Report",
    "Result",
    "SiteReport",
    "Skipped",
    "Totals",
    "UnknownArchitectureError",
    "available_models",
    "compress",
    "create_model",
    "export_onnx",
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

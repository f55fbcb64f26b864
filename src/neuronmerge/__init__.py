"""neuronmerge: data-free neuron merging for trained PyTorch networks."""

__version__ = "0.1.0"

"""ocl: online continual learning over frozen features, scored prequentially."""

from ocl.errors import OCLError

__version__ = "0.1.0"
__all__ = ["OCLError", "__version__"]

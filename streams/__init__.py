"""Stream sources, stream protocols and frozen feature extraction (imported as ``ocl.streams``)."""

from ocl.streams.base import ArrayImageSet, ImageSet, Source, check_labels

__all__ = ["ArrayImageSet", "ImageSet", "Source", "check_labels"]

"""featurecache: frozen CNN codes, memoized in HDF5, with light scikit-learn heads on top."""

__version__ = "0.1.0"

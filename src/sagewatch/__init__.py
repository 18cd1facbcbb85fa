"""sagewatch: unsupervised anomaly detection on multivariate sensor time series."""

__version__ = "0.1.0"

__all__ = ["__version__"]

"""lipnorm: the spectral norm of neural-network weights, for every array library."""

__version__ = "0.1.0"

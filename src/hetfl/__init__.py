"""hetfl: federated learning across heterogeneous devices."""

__version__ = "0.1.0"

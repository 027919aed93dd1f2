"""hub-worker: turns spokes' session events on NATS into the hub's state in PostgreSQL."""

__version__ = "0.1.0"

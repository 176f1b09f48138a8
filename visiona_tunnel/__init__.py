"""visionA tunnel: structured-concurrency reverse tunnels on trio."""

__version__ = "0.1.0"

__all__ = ["__version__"]

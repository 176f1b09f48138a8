"""Pieces both services share: configuration from the environment, JSON logs, errors."""

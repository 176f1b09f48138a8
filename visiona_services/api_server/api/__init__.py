"""The api-server's routes, one module per domain; each has ``register(app)``."""

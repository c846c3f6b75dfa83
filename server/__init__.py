"""bgtasks service: FastAPI background tasks with a durable registry.

Importing this package is cheap (no FastAPI): the CLI reads `__version__` and `paths` from it.
"""

__version__ = "0.1.0"

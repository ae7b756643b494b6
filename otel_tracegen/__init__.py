"""otel-tracegen: learn how a microservice system calls itself, and generate, repair and explain traces."""

__version__ = "0.1.0"

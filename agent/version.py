"""Versions reported by grpc.Health/Version."""

from agent import __version__ as AGENT_VERSION

# The agent API version we speak; Kata's agent reports the same string for this API.
API_VERSION = "0.0.1"

__all__ = ["AGENT_VERSION", "API_VERSION"]

"""sandbox-agent: guest agent."""
__version__ = "0.1.0"

"""llara: turn any decoder-only LLM into a dense retriever with the LLaRA method."""
__version__ = "0.1.0"

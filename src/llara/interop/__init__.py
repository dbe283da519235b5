"""Interoperability: sentence-transformers model files, MTEB tasks from local BEIR collections,
PEFT adapter directories. Nothing here is imported by the core library unless asked for."""

"""workbench: an educational workbench for LLM inference systems."""
__version__ = "0.1.0"

"""Exporters of compressed models to other runtimes' formats (GGUF for llama.cpp: ``export.gguf``)."""

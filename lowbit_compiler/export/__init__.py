"""Exporters: a compressed model written in the formats serving engines load.

* ``compressed_tensors.export_compressed_tensors(model, out_dir)``: compressed-tensors (vLLM);
* ``gguf.export_gguf(model, out_path)``: GGUF (llama.cpp).

``lowbit export DIR --format {compressed-tensors,gguf} OUT`` runs them on a saved checkpoint.
"""

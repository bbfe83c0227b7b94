"""Backends, imported as ``lowbit_compiler.backends``: the torch.compile backend, lowering, kernels."""

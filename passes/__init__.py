"""Built-in passes, imported as ``lowbit_compiler.passes``: one module per pass family.

Importing this package registers every built-in pass by name (see ``registered_passes()``).
"""
from lowbit_compiler.passes import (act_sparsity, canonicalize, kv_cache, quantize, rotate, smooth,  # noqa: F401
                                    sparsify)  # (registration)

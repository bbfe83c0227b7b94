"""A cache keyed by the identity of a live tensor (``nn.Parameter`` or a quantized buffer).

Tensors cannot be dict keys by value (``==`` is elementwise), and ``id()`` alone can be reused
after an object dies. Each entry keeps a weak reference to its owner and is dropped when the owner
is collected; an entry whose owner is gone, or whose in-place version counter moved, is a miss.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Hashable

import torch


class IdentityCache:
    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[weakref.ref, int, Any]] = {}
        self.misses = 0  # how many values were actually computed

    def get(self, owner: torch.Tensor, key: Hashable, default: Any = None) -> Any:
        """The value stored for ``owner`` under ``key`` (still alive, not edited in place), else default."""
        entry = self._entries.get((id(owner), key))
        if entry is not None and entry[0]() is owner and entry[1] == owner._version:
            return entry[2]
        return default

    def get_or_create(self, owner: torch.Tensor, key: Hashable, make: Callable[[], Any]) -> Any:
        entry = self._entries.get((id(owner), key))
        if entry is not None and entry[0]() is owner and entry[1] == owner._version:
            return entry[2]
        self.misses += 1
        value = make()
        self.put(owner, key, value)
        return value

    def put(self, owner: torch.Tensor, key: Hashable, value: Any) -> None:
        full_key = (id(owner), key)
        entries = self._entries

        def forget(ref: weakref.ref, full_key: tuple = full_key) -> None:
            current = entries.get(full_key)
            if current is not None and current[0] is ref:
                del entries[full_key]

        self._entries[full_key] = (weakref.ref(owner, forget), owner._version, value)

    def drop(self, owner: torch.Tensor, key: Hashable) -> None:
        """Forget what is stored for ``owner`` under ``key`` (nothing when there is none)."""
        entry = self._entries.get((id(owner), key))
        if entry is not None and entry[0]() is owner:
            del self._entries[(id(owner), key)]

    def holds(self, owner: torch.Tensor) -> bool:
        """Whether any live entry (owner alive, not edited in place since) belongs to ``owner``."""
        return any(key[0] == id(owner) and entry[0]() is owner and entry[1] == owner._version
                   for key, entry in self._entries.items())

    def __len__(self) -> int:
        return len(self._entries)

"""Whether an optimizer's state holds other tensors than at the last look, at about the cost of
listing the ids of its values: what the monitor measures of the state (its bytes, which moments are
compressed) is measured again only then, not at every sampled step."""

from __future__ import annotations

import weakref
from itertools import chain

from torch import Tensor

__all__ = ["StateWatch"]


class StateWatch:
    """Compares the state's tensors, by identity and in order, with those of the last look.

    The ids of every value of every per-parameter state dict are listed in one pass that runs in
    C; only when that list differs (an optimizer that keeps its step count as a Python number
    changes it at every step) are the tensors picked out and compared. A weak reference to each
    tensor of the last look marks the state as changed when one of them is freed: a new tensor
    that gets a freed one's id is not taken for it.

    What escapes it: a tensor changed in place (``resize_``, ``set_``, ``t.data = other``: its
    size or dtype), and a tensor moved to another key of the same parameter's state.
    """

    def __init__(self):
        self._ids: list[int] | None = None      # every value's id, at the last look
        self._tensors: list[int] | None = None  # the tensors' ids, at the last look
        self._refs: list = []
        self._freed = False

    def reset(self) -> None:
        """The next look reports a change (the parameters watched changed)."""
        self._ids = self._tensors = None

    def changed(self, state: dict) -> bool:
        """Whether ``state`` (``optimizer.state``) holds other tensors than at the last call
        (True at the first)."""
        try:
            ids = list(map(id, chain.from_iterable(map(dict.values, state.values()))))
        except TypeError:  # a per-parameter state that is not a dict: no cheap look
            self.reset()
            return True
        if ids == self._ids and not self._freed:
            return False
        tensors = [v for v in chain.from_iterable(map(dict.values, state.values()))
                   if isinstance(v, Tensor)]
        tensor_ids = list(map(id, tensors))
        self._ids = ids
        if tensor_ids == self._tensors and not self._freed:
            return False
        self._tensors, self._freed = tensor_ids, False
        try:
            self._refs = [weakref.ref(t, self._on_freed) for t in tensors]
        except TypeError:  # a tensor without weak references: look again every time
            self._refs, self._tensors = [], None
        return True

    @property
    def freed(self) -> bool:
        """Whether a tensor of the last look has been freed since."""
        return self._freed

    def _on_freed(self, _ref) -> None:
        self._freed = True

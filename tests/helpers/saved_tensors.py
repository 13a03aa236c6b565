"""How much autograd keeps for the backward pass, counted with saved-tensor hooks."""

from __future__ import annotations

import weakref

import torch


def max_live_saved(fn):
    """Most tensors, and most bytes, that autograd graphs held at once while ``fn`` ran (and its
    result lived): ``(tensors, bytes, result)``. Tensors saved inside a non-reentrant
    ``torch.utils.checkpoint`` region go to checkpoint's own hooks and are not counted; the
    inputs it keeps for recomputing are."""

    class Saved:
        def __init__(self, tensor):
            self.tensor = tensor
            self.nbytes = tensor.numel() * tensor.element_size()

    live, peak = weakref.WeakSet(), [0, 0]

    def pack(tensor):
        box = Saved(tensor)
        live.add(box)
        peak[0] = max(peak[0], len(live))
        peak[1] = max(peak[1], sum(b.nbytes for b in live))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
        result = fn()
    return peak[0], peak[1], result


def max_live_saved_tensors(fn):
    """Most tensors that autograd graphs held at once while ``fn`` ran: ``(tensors, result)``."""
    tensors, _, result = max_live_saved(fn)
    return tensors, result

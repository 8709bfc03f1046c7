"""Kernel launches of a piece of code, for the benchmarks: the aten ops it dispatches that launch a kernel
(seen by a TorchDispatchMode, backward included), plus kernels launched outside aten.

The count is of aten operators, not of CUDA kernels: one op usually launches one kernel (cuDNN's batch norm
may launch two; a view or an allocation launches none and is not counted). Kernels launched outside aten,
such as the fused path's Triton kernels, are invisible to the mode: their launcher reports each launch through
``note_launch`` (the fused-kernel code calls it next to ``kernel[grid](...)``; a custom op outside the ``aten``
namespace is not counted itself, so its kernels are counted once, by that call).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that allocate, alias or read metadata: no kernel
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh", "_local_scalar_dense", "set_", "resize_", "_resize_output_", "record_stream",
              "is_same_size", "_has_compatible_shallow_copy_type", "sym_size", "sym_stride", "sym_numel"}

_outside_aten = 0
_lock = threading.Lock()


def note_launch(count: int = 1) -> None:
    """Report ``count`` kernel launches made outside aten (e.g. a Triton kernel); cheap, always on."""
    global _outside_aten
    with _lock:
        _outside_aten += count


def launches_outside_aten() -> int:
    """Launches reported through ``note_launch`` so far in this process."""
    return _outside_aten


def launches_kernel(func) -> bool:
    """Whether an aten overload launches a kernel (not a view, an allocation or a metadata read)."""
    if func.namespace != "aten":
        return False
    return not (func.is_view or func.__name__.split(".")[0] in _NO_KERNEL)


class LaunchCounter(TorchDispatchMode):
    """``with LaunchCounter() as c: ...`` -> ``c.count`` launches (``c.ops``: by aten op) in the block."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.count = 0
        self._start = 0

    def __enter__(self):
        self._start = launches_outside_aten()
        return super().__enter__()

    def __exit__(self, *exc):
        self.count = sum(self.ops.values()) + launches_outside_aten() - self._start
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if launches_kernel(func):
            self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def count_launches(fn: Callable[[], object]) -> int:
    """Kernel launches of one call of ``fn`` (aten ops that launch kernels + reported outside-aten ones)."""
    with LaunchCounter() as counter:
        fn()
    return counter.count

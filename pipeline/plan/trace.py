"""Run a step's own code on fake tensors and count what it would hold on the device.

``fake_world`` is the one fake mode a plan runs in: torch's FakeTensorMode (shapes, dtypes and devices
propagate; nothing is allocated), plus two shims that let unmodified project code run in it:

- ``HostValues``: an op whose tensor inputs are all real runs for real, and so does a factory (an op with
  no tensor input) of integer or boolean values of at most ``HOST_NUMEL`` elements. Host-side metadata
  (token ids and positions, attention masks, image grids, scheduler timesteps, optimizer step counters)
  then keeps its values, so the code's data-dependent branches (``nonzero``, ``.item()``, ``.tolist()``)
  work on it. An op that reads a fake tensor stays fake, and so does every floating-point factory (noise,
  zeros of embeddings, model weights): device data. ``.item()`` of a fake tensor has no value: it returns
  a stated stand-in (``FAKE_SCALAR``: True, 1, 1.0), which reaches checks such as ``isfinite(loss)`` and
  generate's stopping test (so a traced generate stops after its first token).
- ``swap_tensors``: ``Module.to`` swaps each fake parameter with its converted copy, which torch refuses
  while the fake mode's memo holds a weak reference to it; the memo (a cache of real -> fake conversions)
  is cleared just before each swap, so ``.to(dtype)`` / ``.float()`` work as on real modules.

``LiveBytes`` counts live tensor storages by category (weights, gradients, optimizer, ema, inputs,
activations) and keeps the category split at the peak of the total: what torch's
``torch.distributed._tools.mem_tracker.MemTracker`` reports, at a small fraction of its cost (it walks
every module's statistics at every op: 37 s instead of 1.4 s for SD3-medium's forward and backward at
1024 px here, with the same peak). Storages are counted once however many views share them; a tensor
created during the step counts as an activation unless it becomes a parameter's ``.grad``.

``Flops`` counts FLOPs with the formulas of torch's ``torch.utils.flop_counter`` (matmuls, convolutions,
attention; elementwise ops are not counted), per top-level module called. Not ``FlopCounterMode`` itself:
its module tracker's hooks keep tensors alive, so that under it gradient checkpointing saves nothing (a
6-block SD3 transformer's backward: 28.6 MB of new allocations under it, 11.8 MB without it or under
LiveBytes). Torch's registry has no formula for the CPU flash-attention kernel that
scaled_dot_product_attention picks on the CPU: it is given the CUDA kernels' (``CPU_ATTENTION_FLOPS``).

``trace`` runs a callable under both; ``measure`` runs it on real tensors under torch.profiler instead
(the calibration of tests/test_plan.py).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

CATEGORIES = ("weights", "gradients", "optimizer", "ema", "inputs", "activations")
FAKE_SCALAR = {torch.bool: True}  # .item() of a fake tensor; other dtypes: 1 / 1.0
HOST_NUMEL = 1 << 22              # integer / boolean factories up to this many elements are host metadata


def _stand_in(t: torch.Tensor):
    if t.dtype in FAKE_SCALAR:
        return FAKE_SCALAR[t.dtype]
    return 1.0 if t.dtype.is_floating_point else 1


def _host_sized(out) -> bool:
    tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    return (bool(tensors) and not any(t.dtype.is_floating_point or t.dtype.is_complex for t in tensors)
            and sum(t.numel() for t in tensors) <= HOST_NUMEL)


class HostValues(TorchDispatchMode):
    """Real inputs -> a real op, small integer factories real (see the module docstring); ``.item()`` of a
    fake -> FAKE_SCALAR."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if tensors and not any(isinstance(t, FakeTensor) for t in tensors):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            return _stand_in(args[0])
        out = func(*args, **kwargs)
        if not tensors and _host_sized(out):  # the fake run gave its dtype and size; now for real
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return out


@contextlib.contextmanager
def _swappable(mode: FakeTensorMode) -> Iterator[None]:
    original = torch.utils.swap_tensors

    def swap(t1, t2):
        mode.fake_tensor_converter.meta_converter.tensor_memo.clear()
        return original(t1, t2)

    torch.utils.swap_tensors = swap
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


@contextlib.contextmanager
def fake_world() -> Iterator[FakeTensorMode]:
    """The fake mode every model and step of a plan lives in (one mode: fakes of two modes cannot meet)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, _swappable(mode), HostValues():
        yield mode


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules in ``dtype`` (what ``from_pretrained(dtype=...)`` gives), then restore the default."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


class LiveBytes(TorchDispatchMode):
    """Live storage bytes by category (CATEGORIES) and the split at the peak of their total."""

    def __init__(self):
        super().__init__()
        self.now: Counter[str] = Counter()
        self.peak: dict[str, int] = {}
        self.peak_total = 0
        self._cat: dict[int, str] = {}
        self._size: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def add(self, category: str, tensors: Iterable[torch.Tensor]) -> None:
        """Count ``tensors`` (already alive) under ``category``; one already counted is moved to it."""
        for t in tensors:
            self._track(t, category, retag=True)
        self._update_peak()

    def _track(self, t: torch.Tensor, category: str, retag: bool = False) -> None:
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse / nested layouts: none here
            return
        key = id(st)
        if key in self._refs:
            if retag and self._cat[key] != category:
                self.now[self._cat[key]] -= self._size[key]
                self.now[category] += self._size[key]
                self._cat[key] = category
            return
        size = st.nbytes()
        self._refs[key] = weakref.ref(st, lambda _, k=key: self._free(k))
        self._cat[key], self._size[key] = category, size
        self.now[category] += size

    def _free(self, key: int) -> None:
        self.now[self._cat.pop(key)] -= self._size.pop(key)
        self._refs.pop(key, None)

    def _update_peak(self) -> None:
        total = sum(self.now.values())
        if total > self.peak_total:
            self.peak_total, self.peak = total, dict(self.now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, "activations")
        self._update_peak()
        return out


@contextlib.contextmanager
def grads_counted(counter: LiveBytes, params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """While open, a parameter's ``.grad`` is counted as a gradient once autograd has accumulated it."""
    handles = [p.register_post_accumulate_grad_hook(lambda p: counter.add("gradients", [p.grad]))
               for p in params if p.requires_grad]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _sdpa(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _sdpa_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward}


class Flops(TorchDispatchMode):
    """FLOPs by torch's formulas (module docstring), in total and by the top-level module running (its class
    name; "" outside any module). Module scope comes from global forward hooks, which hold no tensor."""

    def __init__(self):
        super().__init__()
        self.formulas = {**flop_registry, **CPU_ATTENTION_FLOPS}
        self.total = 0
        self.by_module: Counter[str] = Counter()
        self._stack: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            n = formula(*args, **kwargs, out_val=out)
            self.total += n
            self.by_module[self._stack[0] if self._stack else ""] += n
        return out

    def _enter(self, module, args):
        self._stack.append(type(module).__name__)

    def _exit(self, module, args, out):
        self._stack.pop()

    @contextlib.contextmanager
    def scoped(self) -> Iterator["Flops"]:
        """The mode, with the module-scope hooks installed for as long as it is on."""
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        handles = (register_module_forward_pre_hook(self._enter), register_module_forward_hook(self._exit))
        try:
            with self:
                yield self
        finally:
            for h in handles:
                h.remove()


@dataclass
class Trace:
    """One traced call: the peak of live device bytes (total and by category), FLOPs, trace seconds."""

    peak_bytes: int
    by_category: dict[str, int]
    flops: int
    seconds: float
    flops_by_module: dict[str, int] = field(default_factory=dict)  # top-level modules called (class names)


def trace(fn: Callable[[], object], resident: dict[str, Iterable[torch.Tensor]],
          trainable: Iterable[torch.nn.Parameter] = ()) -> Trace:
    """Run ``fn`` (inside ``fake_world``) counting live bytes and FLOPs. ``resident``: category -> the
    tensors alive before the call (weights, optimizer state, inputs...); ``trainable``: parameters whose
    gradients are counted as such. The peak is over the whole call, the resident tensors included."""
    counter = LiveBytes()
    for category, tensors in resident.items():
        counter.add(category, tensors)
    flops = Flops()
    t0 = time.perf_counter()
    with grads_counted(counter, trainable), flops.scoped(), counter:
        fn()
    return Trace(counter.peak_total, {k: v for k, v in counter.peak.items() if v}, flops.total,
                 time.perf_counter() - t0, dict(flops.by_module))


def _allocation_peak(prof) -> int:
    """The peak of the running total of the CPU allocator's allocations (and frees) a profile recorded."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    now = peak = 0
    for _, size in sorted(events):
        now += size
        peak = max(peak, now)
    return peak


def measure(fn: Callable[[], object], resident: dict[str, Iterable[torch.Tensor]],
            trainable: Iterable[torch.nn.Parameter] = ()) -> Trace:
    """``trace``'s counterpart on real tensors, measured rather than counted: the bytes of the ``resident``
    tensors plus the peak of what the CPU allocator allocated during ``fn`` (torch.profiler's memory
    events: kernel temporaries included). No FLOPs, no split by category."""
    from torch.profiler import ProfilerActivity, profile

    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for ts in resident.values() for t in ts}
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return Trace(sum(storages.values()) + _allocation_peak(prof), {}, 0, time.perf_counter() - t0)


def module_tensors(*modules: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``modules`` (shared ones once)."""
    seen: dict[int, torch.Tensor] = {}
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            seen.setdefault(id(t), t)
    return list(seen.values())

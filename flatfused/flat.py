"""Flat buffers: the parameters of one (param group, device, dtype) as views into one tensor.

One kernel launch then covers a whole buffer. Parameters keep their shapes and strides (a dense
non-contiguous parameter, e.g. channels_last, keeps its memory order inside the buffer);
gradients live as views of one flat gradient buffer; optimizer state is flat too.

Anything that breaks the views is detected by data pointer before each use: a gradient replaced
by another tensor (DDP's ``gradient_as_bucket_view``, ``create_graph``) is gathered back into the
flat buffer (with one warning); a parameter whose storage was replaced on the same device and
dtype is gathered too; a parameter moved to another device or dtype is an error.

A gradient that is ``None`` (never computed, or set to ``None``) stays ``None``, as in torch: its
slot of the flat gradient buffer is kept at zero and the parameter is *missing* (the base
update skips it, see optim/base_step.py). A hook on each parameter attaches a missing slot as
``.grad`` just before autograd first accumulates into it, so that gradients land in the flat
buffer in place (no copy, no second gradient-sized allocation at the first backward).
"""
from __future__ import annotations

import sys
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from ._memory import overlapping_pairs
from .distributed import shard_groups

_warned: set[str] = set()
# The buffer each parameter was last flattened into, by id(parameter): (a weak reference to the
# parameter, to tell a reused id; the owning buffer's weak reference). A parameter belongs to
# one flat optimizer at a time: one created later over the same parameters takes them over, and
# the earlier one's hooks stand down (it refuses to step them, see FlatBuffer.check_params).
# Kept here rather than on the parameter, whose __dict__ pickles with the model.
_owners: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _owner_of(p: torch.Tensor) -> weakref.ref | None:
    entry = _owners.get(id(p))
    return entry[1] if entry is not None and entry[0]() is p else None


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill a block of exactly ``numel`` memory slots (any permutation)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda s: s[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def view_like(flat: torch.Tensor, p: torch.Tensor, offset: int) -> torch.Tensor:
    """A view of ``flat[offset : offset + p.numel()]`` with ``p``'s shape and (dense) strides."""
    if p.is_contiguous():
        return flat.narrow(0, offset, p.numel()).view(p.shape)
    return flat.as_strided(p.shape, p.stride(), flat.storage_offset() + offset)


@dataclass
class Segment:
    """A run of buffer elements whose noise indices are consecutive."""

    start: int  # first element in the buffer
    length: int
    base: int  # logical (noise) index of the first element


@dataclass
class FlatBuffer:
    """The parameters of one param group on one device with one dtype."""

    group_index: int
    params: list[torch.Tensor]
    offsets: list[int]
    bases: list[int]  # logical index of each parameter's first element
    data: torch.Tensor
    grad: torch.Tensor
    segments: list[Segment]
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    # The per-parameter views of ``state`` tensors last put into the base optimizer's state, by
    # name (base_step.py recognises them by identity instead of re-checking every address).
    state_views: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    # Adam's per-parameter step counts behind their views in the base optimizer's state (kept
    # out of ``state``, which is flat per element).
    step_counts: torch.Tensor | None = None
    sharded = False  # class attribute: a ShardBuffer keeps a sharded parameter where it lives
    # Whether the optimizer perturbs these parameters (a param_filter leaves some unperturbed:
    # their buffers skip the perturbation and restore passes).
    perturbed: bool = True
    # Process groups over which this buffer's partial reductions (norms, overflow flags) still
    # need reducing: a ShardBuffer's (see flatfused.distributed.shard_groups); none here.
    shard_groups: tuple = ()
    # Version of ``grad`` right after flatfused zeroed it, to skip zeroing it again within one
    # optimizer call. Autograd's accumulation and every in-place op on ``p.grad`` bump the shared
    # version counter, but writes through ``p.grad.data`` do not (they are outside autograd's
    # view of the tensor): every optimizer call starts by forgetting it (:meth:`forget_zero`).
    _zero_version: int | None = None
    # Indices of the parameters whose ``.grad`` is None: their slots of ``grad`` hold zeros, and
    # the base update skips them (as torch.optim skips a parameter without a gradient).
    missing: set[int] = field(default_factory=set)
    # Set during a step's forward-backward passes, whose gradients add up in ``grad``: a
    # gradient the closure set to None is then re-attached with the earlier passes' sum.
    accumulating: bool = False
    # Set instead during a pass that adds to the gradients from before the step (Weighted SAM's
    # first, as its reference's): a gradient the closure set to None restarts from zero there.
    restarting: bool = False
    # While counting (count_accumulations): the parameters autograd accumulated into, and how
    # many accumulations (each bumps grad's version counter once when it adds in place).
    received: set[int] | None = None
    accumulations: int = 0
    # During a step's pass: the parameters autograd accumulated into with their slot as
    # ``.grad``. A tensor that replaced such a gradient afterwards (DDP's bucket view under
    # ``gradient_as_bucket_view=True``, the out-of-place sum of ``backward(create_graph=True)``)
    # was made from the slot's sum, earlier passes included: the check copies it. The
    # gradient hook notes that the slot is ``.grad`` (``_slot_is_grad``), the post-accumulate
    # hook that autograd did accumulate (``torch.autograd.grad`` runs the first alone).
    fed: set[int] | None = None
    _slot_is_grad: set[int] = field(default_factory=set)
    # Data pointers of the parameters / gradients (None where missing) at the last check: a
    # step checks several times, and an unchanged list is one comparison.
    _param_ptrs: list[int] | None = None
    _grad_ptrs: list[int | None] | None = None
    # (address of ``grad``, the address of each parameter's slot of it): _slot_pointers.
    _slot_ptrs: tuple | None = None
    # Per-parameter views of the flat gradient tensors, by tensor (see attached_views).
    _view_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def numel(self) -> int:
        return self.data.numel()

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter views of a flat tensor laid out like this buffer."""
        return [view_like(flat, p, o) for p, o in zip(self.params, self.offsets)]

    def attached_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`views` of ``flat`` (the gradient buffer, the accumulator the three-call API
        swaps with it, or other flat state such as Weighted SAM's saved gradient), made once per
        tensor: gradients are re-attached at every backward after ``zero_grad(set_to_none=True)``,
        and making 64 views costs about 0.3 ms. The same view objects come back as ``.grad``
        each time (views of the same memory either way); use them through :meth:`slot_view`,
        which re-makes one that was re-pointed. Entries for tensors the buffer no longer holds
        are dropped at the next miss."""
        entry = self._view_cache.get(id(flat))
        if entry is not None and entry[0] is flat:
            return entry[1]
        held = [self.grad, *self.state.values()]
        self._view_cache = {key: e for key, e in self._view_cache.items()
                            if any(e[0] is t for t in held)}
        views = self.views(flat)
        self._view_cache[id(flat)] = (flat, views)
        return views

    def slot_view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """Parameter ``i``'s cached view of ``flat`` (:meth:`attached_views`), checked: a view
        handed out as ``.grad`` may since have been re-pointed (``p.grad.data = ...``,
        ``set_``), and is then made again."""
        views = self.attached_views(flat)
        view, p = views[i], self.params[i]
        if p.numel() and (view.data_ptr() != flat.data_ptr() + self.offsets[i] * flat.element_size()
                          or view.shape != p.shape):
            view = views[i] = view_like(flat, p, self.offsets[i])
        return view

    def state_buffer(self, name: str, dtype: torch.dtype | None = None, zero=False) -> torch.Tensor:
        """Flat optimizer state ``name`` (allocated on first use)."""
        buf = self.state.get(name)
        if buf is None:
            buf = (torch.zeros if zero else torch.empty)(
                self.numel, dtype=dtype or self.dtype, device=self.device)
            self.state[name] = buf
        return buf

    def mark_grad_zero(self) -> None:
        self._zero_version = self.grad._version

    def mark_grad_written(self) -> None:
        """Call after any kernel that writes ``grad``: Triton launches bump no version counter."""
        self._zero_version = None

    def grad_is_zero(self) -> bool:
        return self._zero_version is not None and self._zero_version == self.grad._version

    def forget_zero(self) -> None:
        """Stop trusting that ``grad`` is zero: user code ran since flatfused zeroed it, and a
        write through ``.grad.data`` would not show in the version counter."""
        self._zero_version = None

    def grad_is_shared(self) -> bool:
        """Whether something besides this buffer and its parameters holds the gradient buffer's
        memory: a ``.grad`` the user kept (a logger, a gradient-noise tracker), or a tensor made
        from one (``grad.view(-1)``, ``grad[0]``). ``zero_grad(set_to_none=True)`` must then
        leave that memory to its holder, as torch does, instead of zeroing it and wiring it to
        the next backward again.

        Each tensor on a storage holds one use of it: ``grad`` itself, the cached per-parameter
        views, and the storage object made to ask; any more is a foreign tensor. A kept view
        object that is one of the cached ones adds no use, so its Python references tell: the
        cache's list, the loop's name and the call's argument, plus ``p.grad`` where attached."""
        flat = self.grad
        entry = self._view_cache.get(id(flat))
        views = entry[1] if entry is not None and entry[0] is flat else []
        if torch._C._storage_Use_Count(flat.untyped_storage()._cdata) > 2 + len(views):
            return True
        for i in range(len(views)):
            view = views[i]
            attached = self.params[i].grad is view
            if sys.getrefcount(view) > 3 + attached:
                return True
        return False

    def replace_grad(self) -> None:
        """A fresh zeroed gradient buffer (every ``.grad`` must be None, see release_grads): the
        current one, with its values, stays with whoever holds views of it."""
        old, self.grad = self.grad, torch.zeros_like(self.grad)
        self._view_cache.pop(id(old), None)
        self._slot_ptrs = None
        self._grad_ptrs = _grad_pointers(self.params)
        self.mark_grad_zero()

    def exchange_grad(self, other: torch.Tensor) -> torch.Tensor:
        """Make the flat tensor ``other`` (laid out like ``grad``; the caller filled it) the
        gradient buffer: every ``p.grad`` becomes a view of it. Returns the previous gradient
        buffer, whose values stay where they were. Used where handing the gradients over costs
        less than copying them out (a few microseconds per parameter against three streams of
        its elements); ``p.grad`` is then another tensor, as after ``zero_grad(set_to_none=True)``
        and the next backward."""
        previous, self.grad = self.grad, other
        for i, p in enumerate(self.params):
            if i not in self.missing:  # a missing gradient stays None (its slot of other is 0)
                p.grad = self.slot_view(other, i)
        self._grad_ptrs = _grad_pointers(self.params)
        self._zero_version = None
        return previous

    def _attached(self, flat: torch.Tensor) -> list[tuple[int, torch.Tensor, int]]:
        """(i, param, address its view of ``flat`` starts at) for each parameter. Both checks run
        before every kernel: one pass of plain integer arithmetic keeps them cheap."""
        base, size = flat.data_ptr(), flat.element_size()
        return [(i, p, base + o * size) for i, (p, o) in enumerate(zip(self.params, self.offsets))]

    def _slot_pointers(self) -> list[int]:
        """The address of each parameter's slot of ``grad`` (what ``_grad_pointers`` reads when
        every ``.grad`` is attached), made once per gradient buffer."""
        base = self.grad.data_ptr()
        if self._slot_ptrs is None or self._slot_ptrs[0] != base:
            self._slot_ptrs = (base, [ptr for _, _, ptr in self._attached(self.grad)])
        return self._slot_ptrs[1]

    def check_params(self) -> None:
        """Re-attach parameters whose storage was replaced; refuse ones that changed device/dtype
        or that a flat optimizer created later took over."""
        if [p.data_ptr() for p in self.params] == self._param_ptrs:
            return
        for p in self.params:
            if _owner_of(p) is not self._owner:
                raise RuntimeError(
                    f"a parameter of shape {tuple(p.shape)} was flattened again by a flatfused "
                    "optimizer created after this one over the same parameters; only the newer "
                    "one can step them (create one flat-minima optimizer per parameter set)")
        for i, p, ptr in self._attached(self.data):
            if p.data_ptr() == ptr or p.numel() == 0:
                continue
            if p.device != self.device or p.dtype != self.dtype:
                raise RuntimeError(_moved_message(p, self))
            if p.shape != self.params_shape(i):
                raise RuntimeError(
                    f"a parameter changed shape from {self.params_shape(i)} to {tuple(p.shape)} "
                    "after the optimizer flattened it")
            warn_once("param-gather", "flatfused: a parameter's storage was replaced after "
                      "flattening (e.g. `p.data = ...`); copying it back into the flat buffer")
            view = view_like(self.data, p, self.offsets[i])
            view.copy_(p.data)
            p.data = view
        self._param_ptrs = [p.data_ptr() for p in self.params]

    def params_shape(self, i: int) -> tuple:
        return tuple(self._shapes[i])

    def check_grads(self, accumulate: bool = False, synced: bool = False) -> None:
        """Re-attach gradients that were replaced (gathering their values); record the ones that
        are None as missing (their slots zeroed).

        ``accumulate``: the check after a pass of a step, whose gradients add up: a gradient the
        pass set to None keeps the earlier passes' sum (re-attached) unless it was missing
        already, and a replaced gradient that holds only the latest pass (one the closure
        assigned) is added to the buffer, which kept the earlier ones. A replacement made from
        the slot's sum is copied: one autograd accumulated through the slot before (``fed``),
        or any after a pass DDP synchronised (``synced``: its reducer averaged what ``.grad``
        held, earlier passes included, also for a parameter this rank's pass did not use).
        """
        pointers = _grad_pointers(self.params)
        if pointers == self._grad_ptrs:
            return
        if pointers == self._slot_pointers():
            # Every gradient is its slot again (a backward attached them after
            # zero_grad(set_to_none=True)): none is missing, nothing to gather.
            self.missing.clear()
            self._grad_ptrs = pointers
            return
        for i, p, ptr in self._attached(self.grad):
            if p.numel() == 0:  # nothing to update: never missing
                continue
            g = p.grad
            if g is not None and g.data_ptr() == ptr:
                self.missing.discard(i)
                continue
            view = self.slot_view(self.grad, i)
            if g is None:
                if i in self.missing:
                    continue
                if accumulate:
                    p.grad = view
                else:
                    view.zero_()
                    self.missing.add(i)
                continue
            if g.is_sparse:
                raise RuntimeError(
                    "flatfused optimizers do not support sparse gradients (parameter of shape "
                    f"{tuple(p.shape)}); use a dense embedding or torch.optim.SparseAdam")
            if g.device != self.device or g.shape != p.shape:
                raise RuntimeError(
                    f"gradient of shape {tuple(g.shape)} on {g.device} does not match its "
                    f"parameter ({tuple(p.shape)} on {self.device})")
            warn_once("grad-gather", "flatfused: a gradient was replaced by another tensor "
                      "(DDP gradient_as_bucket_view, backward(create_graph=True), ...); "
                      "gathering it into the flat gradient buffer each time costs a copy")
            if accumulate and not synced and i not in (self.fed or ()):
                view.add_(g)
            else:
                view.copy_(g)
            self.missing.discard(i)
            p.grad = view
        self._grad_ptrs = _grad_pointers(self.params)

    def attach_missing(self, indices) -> None:
        """Attach the slots of the missing gradients among parameters ``indices`` as their
        ``.grad``: something wrote their slots (an all-reduce of the whole buffer), which now
        hold their gradients."""
        attached = [i for i in indices if i in self.missing]
        for i in attached:
            self._attach(i)
        if attached:
            self._grad_ptrs = None

    def attach_missing_for_pass(self) -> list[int]:
        """Attach the (zeroed) slots of the missing gradients before a pass, so that whatever
        the pass does to ``.grad`` happens in the flat buffer; returns their indices (those the
        pass does not reach go back with :meth:`drop_gradients`)."""
        indices = [i for i in sorted(self.missing) if self.params[i].requires_grad]
        self.attach_missing(indices)
        return indices

    def drop_gradients(self, indices) -> None:
        """Treat the parameters ``indices`` as without a gradient (missing): ``.grad`` None,
        slot zeroed; the update skips them and puts their saved weights back."""
        for i in indices:
            self.params[i].grad = None
            self.slot_view(self.grad, i).zero_()
            self.missing.add(i)
        if indices:
            self._grad_ptrs = None
            self.mark_grad_written()

    def _attach(self, i: int) -> None:
        """Make parameter ``i``'s slot of ``grad`` its ``.grad`` (no longer missing)."""
        p = self.params[i]
        p.grad = self.slot_view(self.grad, i)
        self.missing.discard(i)

    def release_grads(self) -> None:
        """``zero_grad(set_to_none=True)`` over the buffer, whose ``grad`` the caller zeroed:
        every ``.grad`` None and recorded as missing, so that the next backward's hooks attach
        the zeroed slots again (autograd would otherwise allocate new tensors to be gathered)."""
        for i, p in enumerate(self.params):
            p.grad = None
            if p.numel():  # a zero-size parameter is never missing
                self.missing.add(i)
        self._grad_ptrs = _grad_pointers(self.params)

    def count_accumulations(self) -> None:
        """From now on the gradient hooks record which parameters autograd accumulates into,
        and how many times (:meth:`stop_counting`)."""
        self.received, self.accumulations = set(), 0

    def stop_counting(self) -> tuple[set[int], int]:
        """(indices of the parameters that received a gradient, number of accumulations)."""
        received, accumulations = self.received or set(), self.accumulations
        self.received, self.accumulations = None, 0
        return received, accumulations

    def install_hooks(self) -> None:
        """Register each parameter's gradient hook (:func:`_gradient_hook`) and post-accumulate
        hook (:func:`_accumulated_hook`). The hooks hold the
        buffer weakly and go when it does (or when :meth:`remove_hooks` runs, at a re-flatten);
        copies and pickles of the buffer register their own (hooks are not serialised)."""
        ref = self._owner = weakref.ref(self)
        for key in [k for k, (p_ref, _) in _owners.items() if p_ref() is None]:
            del _owners[key]  # parameters that no longer exist
        for p in self.params:
            _owners[id(p)] = (weakref.ref(p), ref)
        self._hooks = [p.register_hook(_gradient_hook(ref, i)) for i, p in enumerate(self.params)]
        self._hooks += [p.register_post_accumulate_grad_hook(_accumulated_hook(ref, i))
                        for i, p in enumerate(self.params)]
        weakref.finalize(self, _remove_hooks, self._hooks)

    def remove_hooks(self) -> None:
        _remove_hooks(self.__dict__.pop("_hooks", ()))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_hooks", None)  # they hold closures; the copy registers its own
        state.pop("_owner", None)
        state["_view_cache"] = {}  # keyed by id: the copy's tensors are others
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._view_cache = {}
        if not self.sharded:
            self.install_hooks()

    def _attach_before_accumulation(self, i: int) -> None:
        """Called by the parameter's hook when autograd is about to give parameter ``i``, whose
        ``.grad`` is None, a gradient: attach its slot, so that autograd accumulates into the
        flat buffer, when the slot holds what the gradient must start from: zeros (a missing
        gradient), or the sum of the step's earlier passes (``accumulating``). Otherwise the
        gradient was dropped since the last check (``zero_grad(set_to_none=True)``) and
        whoever dropped it may still hold the slot's old view: autograd makes a new tensor,
        and the next check gathers it. In a ``restarting`` pass the dropped gradient restarts
        from zero: the slot is zeroed and attached (the closure's ``model.zero_grad()``)."""
        if self.restarting and i not in self.missing:
            self.slot_view(self.grad, i).zero_()
            if self.received is not None:
                self.accumulations += 1  # the zeroing's version bump is no edit of the closure's
            self._zero_version = None
        if i in self.missing or self.accumulating or self.restarting:
            self._attach(i)


def _moved_message(p: torch.Tensor, buf: FlatBuffer) -> str:
    return (f"a parameter of shape {tuple(p.shape)} moved from {buf.device}/{buf.dtype} to "
            f"{p.device}/{p.dtype} after the optimizer flattened it (model.to(), .double(), "
            "...); create the optimizer after moving or casting the model")


def _grad_pointers(params: list[torch.Tensor]) -> list[int | None]:
    return [None if (g := p.grad) is None else g.data_ptr() for p in params]


def _refuse_sparse(grad: torch.Tensor) -> None:
    # Without this, autograd would silently add a sparse gradient into the dense flat buffer.
    if grad.is_sparse:
        raise RuntimeError(
            "flatfused optimizers do not support sparse gradients (e.g. nn.Embedding(sparse=True)); "
            "use dense gradients or torch.optim.SparseAdam for those parameters")


def _gradient_hook(buffer_ref: weakref.ref, i: int):
    """The hook on parameter ``i`` of a flat buffer: it runs before autograd accumulates a
    gradient into the parameter. It refuses sparse gradients, and where ``.grad`` is None it
    attaches the parameter's slot of the flat gradient buffer (see FlatBuffer.install_hooks)."""
    def hook(grad: torch.Tensor) -> None:
        _refuse_sparse(grad)
        buf = buffer_ref()
        if buf is None:
            return
        p = buf.params[i]
        if _owner_of(p) is not buffer_ref:  # taken over by a newer optimizer's buffer
            return
        if not buf.sharded and (p.dtype != buf.dtype or p.device != buf.device):
            # Before autograd meets the slot's dtype (its own message names no cause).
            raise RuntimeError(_moved_message(p, buf))
        if p.grad is None:
            buf._attach_before_accumulation(i)
        if buf.fed is not None:
            if p.grad is not None and p.grad.data_ptr() == buf._slot_pointers()[i]:
                buf._slot_is_grad.add(i)
            else:
                buf._slot_is_grad.discard(i)
        if buf.received is not None:  # counting (see FlatBuffer.count_accumulations)
            buf.received.add(i)
            buf.accumulations += 1
    return hook


def _accumulated_hook(buffer_ref: weakref.ref, i: int):
    """The hook that runs after autograd accumulated into parameter ``i`` (not after a
    ``torch.autograd.grad``): see ``FlatBuffer.fed``."""
    def hook(_: torch.Tensor) -> None:
        buf = buffer_ref()
        if (buf is not None and buf.fed is not None and i in buf._slot_is_grad
                and _owner_of(buf.params[i]) is buffer_ref):
            buf.fed.add(i)
    return hook


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()


class ShardBuffer(FlatBuffer):
    """The local shard of one sharded (DTensor, e.g. FSDP2) parameter, used where it lives.

    FSDP2 all-gathers parameters from its own shard storage, so the shard cannot move into a
    shared flat buffer: this buffer's ``data`` and ``grad`` are 1-D views of the parameter's
    and the gradient's local tensors. Its segment's noise index is the shard's global element
    index, so a sharded run draws the noise an unsharded one draws. Its flat state (the base
    optimizer's moments included) is local; :meth:`views` wraps it as DTensors laid out like
    the parameter, which is what the base optimizer and distributed checkpointing expect.
    """

    sharded = True

    def check_params(self) -> None:
        p = self.params[0]
        local = p._local_tensor
        if local.data_ptr() != self.data.data_ptr() or local.numel() != self.numel:
            if local.numel() != self.numel or local.dtype != self.dtype:
                raise RuntimeError("a sharded parameter changed its local shape or dtype after the "
                                   "optimizer was created; create the optimizer after sharding")
            self.data = local.view(-1)

    def check_grads(self, accumulate: bool = False, synced: bool = False) -> None:
        """FSDP2 reduce-scatters a gradient into a new DTensor when ``.grad`` is None and adds
        into the one there otherwise: ``grad`` follows its local shard (no copy). A None
        ``.grad`` is missing, as in :meth:`FlatBuffer.check_grads`: ``grad`` is then zeros of
        this buffer's own (whoever dropped the gradient may still hold the old shard), or with
        ``accumulate`` the earlier passes' sum, attached again for FSDP2 to add into. Nothing is
        copied, so ``synced`` changes nothing here."""
        p = self.params[0]
        g = p.grad
        if g is None:
            if 0 in self.missing:
                return
            if accumulate:
                p.grad = self.views(self.grad)[0]
                return
            self.grad = torch.zeros_like(self.data)
            self.mark_grad_zero()
            self.missing.add(0)
            return
        self.missing.discard(0)
        local = g._local_tensor
        if local.data_ptr() != self.grad.data_ptr():
            if local.dtype != self.dtype or local.numel() != self.numel:
                raise RuntimeError(f"gradient shard of dtype {local.dtype} and {local.numel()} "
                                   f"elements does not match its parameter shard")
            self.grad = local.view(-1)
            self._zero_version = None

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` (this shard's size) as a DTensor sharded like the parameter, no copy."""
        from torch.distributed.tensor import DTensor

        p = self.params[0]
        return [DTensor.from_local(flat.view(self._shapes[0]), p.device_mesh, p.placements,
                                   run_check=False, shape=p.shape, stride=p.stride())]


def _is_sharded(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(p, DTensor)


def _shard_buffer(gi: int, p: torch.Tensor, param_base: int) -> ShardBuffer:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = p._local_tensor
    if not local.is_contiguous():
        raise RuntimeError("flatfused supports sharded parameters with contiguous local shards "
                           "(FSDP2's default Shard(0) layout)")
    if not p.is_contiguous():
        raise RuntimeError("flatfused supports sharded parameters of contiguous global layout")
    local_shape, global_offset = compute_local_shape_and_global_offset(
        p.shape, p.device_mesh, p.placements)
    # The shard is a run of consecutive global elements only when it splits the leading dim.
    if any(size != full for size, full in zip(local_shape[1:], p.shape[1:])):
        raise RuntimeError("flatfused supports parameters sharded along their first dimension "
                           f"(FSDP2's Shard(0)); got placements {p.placements}")
    row = 1
    for size in p.shape[1:]:
        row *= size
    first = param_base + (global_offset[0] if global_offset else 0) * row
    missing = p.grad is None  # no gradient yet: FSDP2 gives one at its next reduce-scatter
    grad = torch.zeros_like(local).view(-1) if missing else p.grad._local_tensor.view(-1)
    buf = ShardBuffer(gi, [p], [0], [first], local.view(-1), grad,
                      [Segment(0, local.numel(), first)] if local.numel() else [])
    if missing:
        buf.missing.add(0)
    buf._shapes = [tuple(local.shape)]
    buf.shard_groups = shard_groups(p)
    return buf


def build_flat_buffers(param_groups, first_base: int = 0,
                       unperturbed=frozenset()) -> tuple[list[FlatBuffer], int]:
    """Flatten every parameter that requires grad, per (group, device, dtype, perturbed), in
    group order; ``unperturbed`` holds the (group index, index in the group) of the parameters
    a flat-minima optimizer only updates, without perturbing them.

    Sharded (DTensor) parameters get a :class:`ShardBuffer` each. Returns the buffers and the
    total number of (global) elements: the size of the noise index space.
    """
    _check_distinct(param_groups)
    for group in param_groups:
        for p in group["params"]:
            if p.requires_grad and p.is_meta:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is on the meta device (no memory to "
                    "train); materialise the model first (model.to_empty(device=...) and "
                    "initialise or load it), then create the optimizer")
    buffers: list[FlatBuffer] = []
    base = first_base
    for gi, group in enumerate(param_groups):
        buckets: dict[tuple, list[tuple[torch.Tensor, int]]] = {}
        for pi, p in enumerate(group["params"]):
            if not p.requires_grad:
                continue
            moved = (gi, pi) not in unperturbed
            if _is_sharded(p):
                buffers.append(_shard_buffer(gi, p, base))
                buffers[-1].perturbed = moved
            else:
                buckets.setdefault((p.device, p.dtype, moved), []).append((p, base))
            base += p.numel()
        for (device, dtype, moved), entries in buckets.items():
            buffers.append(_flatten(gi, device, dtype, entries))
            buffers[-1].perturbed = moved
    return buffers, base - first_base


def _check_distinct(param_groups) -> None:
    """Refuse what flattening would silently untie: each parameter that requires grad gets its
    own slot of a new buffer, so one listed twice would be updated twice, and parameters that
    share memory (views of one tensor) would stop sharing it after the first step."""
    params: dict[int, torch.Tensor] = {}
    for group in param_groups:
        for p in group["params"]:
            if id(p) in params:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} appears more than once in "
                                 "the param groups; list each parameter once")
            params[id(p)] = p
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for p in params.values():
        # Sharded parameters live in their own shards; meta tensors have no memory to share.
        if not _is_sharded(p) and not p.is_meta:
            by_device.setdefault(p.device, []).append(p)
    for same_device in by_device.values():
        for i, j in overlapping_pairs(same_device):
            a, b = same_device[i], same_device[j]
            if a.requires_grad or b.requires_grad:  # frozen parameters are not moved
                raise ValueError(
                    f"parameters of shapes {tuple(a.shape)} and {tuple(b.shape)} share memory "
                    "(views of one tensor); a flat-buffer optimizer gives each its own storage, "
                    "which would untie them. Tie weights by using one Parameter object in both "
                    "places, or give each parameter its own storage")


def _flatten(gi, device, dtype, entries) -> FlatBuffer:
    params = [p for p, _ in entries]
    offsets, segments, total = [], [], 0
    for p, b in entries:
        offsets.append(total)
        last = segments[-1] if segments else None
        if last is not None and last.base + last.length == b:
            last.length += p.numel()
        else:
            segments.append(Segment(total, p.numel(), b))
        total += p.numel()
    data = torch.empty(total, dtype=dtype, device=device)
    grad = torch.zeros(total, dtype=dtype, device=device)
    buf = FlatBuffer(gi, params, offsets, [b for _, b in entries], data, grad,
                     [s for s in segments if s.length > 0])
    buf._shapes = [tuple(p.shape) for p in params]
    old_grads = []
    with torch.no_grad():
        for p, o in zip(params, offsets):
            if not _is_dense(p.data):
                p.data = p.data.contiguous()
            view = view_like(data, p, o)
            view.copy_(p.data)
            old_grads.append(p.grad)
            p.data = view
        # The cached views (FlatBuffer.grad_is_shared), made once every parameter has its final
        # strides.
        for i, (p, old_grad, gview) in enumerate(zip(params, old_grads, buf.attached_views(grad))):
            if old_grad is not None:
                if old_grad.is_sparse:
                    raise RuntimeError("flatfused optimizers do not support sparse gradients")
                gview.copy_(old_grad)
                p.grad = gview
            elif p.numel() == 0:
                p.grad = gview
            else:
                buf.missing.add(i)  # no gradient yet: attached by the hook when one comes
        del gview, old_grad
    buf.install_hooks()
    buf._grad_ptrs = _grad_pointers(params)
    return buf

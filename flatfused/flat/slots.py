"""The gradient slots of a flat buffer: each parameter's ``.grad`` is a view of one flat gradient
tensor, kept valid whatever a loop does to ``.grad`` (replaced, set to None, kept by the caller),
and the bookkeeping of a step's passes (which parameters a pass reached, what it wrote)."""
from __future__ import annotations

import sys
import weakref

import torch

from ._warn import warn_once
from .hooks import _accumulated_hook, _gradient_hook, _grad_pointers, _owners, _remove_hooks
from .views import view_like


class GradientSlots:
    """Mixed into :class:`~flatfused.flat.buffer.FlatBuffer`: the gradient side of a buffer (its
    fields are the buffer's)."""

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

    def begin_pass(self, restart: bool) -> None:
        """A step's forward-backward pass begins: its gradients add up with the earlier passes'
        (a gradient the closure sets to None keeps their sum), or with ``restart`` with the
        gradients from before the step (one set to None restarts from zero); and where autograd
        accumulates into a slot is noted (see ``fed``)."""
        self.accumulating, self.restarting = not restart, restart
        self.fed, self._slot_is_grad = set(), set()

    def end_closure(self) -> None:
        """The pass's closure returned (or raised): what ``.grad`` receives is no longer the
        pass's."""
        self.accumulating = self.restarting = False

    def end_pass(self) -> None:
        self.fed = None

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

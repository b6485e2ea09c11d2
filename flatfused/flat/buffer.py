"""A flat buffer: the parameters of one (param group, device, dtype) as views into one tensor,
their gradients as views of one flat gradient tensor (:mod:`.slots`), and flat optimizer state."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._warn import warn_once
from .hooks import _moved_message, _owner_of
from .slots import GradientSlots
from .views import Segment, view_like


@dataclass
class FlatBuffer(GradientSlots):
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

    def state_buffer(self, name: str, dtype: torch.dtype | None = None, zero=False) -> torch.Tensor:
        """Flat optimizer state ``name`` (allocated on first use)."""
        buf = self.state.get(name)
        if buf is None:
            buf = (torch.zeros if zero else torch.empty)(
                self.numel, dtype=dtype or self.dtype, device=self.device)
            self.state[name] = buf
        return buf

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

"""The wrappers of the optimizers' public methods: the open step's rules (:func:`entry_point`)
and GradScaler's attributes dropped on an error."""
from __future__ import annotations

import functools

from .step_state import StepRefused


def entry_point(method):
    """Wraps each public method of a flat-minima optimizer. The outermost call first forgets
    which gradient buffers flatfused knows to be zero (user code ran since, and a write through
    ``.grad.data`` bumps no version counter). A fault anywhere inside abandons the open step:
    the weights go back to ``w0`` exactly, and the base optimizer's state and NSO's RNG stay as
    they were at the step's start. A refusal (:class:`StepRefused`) changed nothing and leaves
    the step open."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        calls = getattr(self, "_calls", None)
        if calls is None:  # torch.optim.Optimizer.__init__ adding the first groups
            return method(self, *args, **kwargs)
        if calls == 0:
            for buf in self._buffers:
                buf.forget_zero()
        self._calls = calls + 1
        try:
            return method(self, *args, **kwargs)
        except StepRefused:
            raise
        except BaseException:
            if self._step.is_open:
                self._abandon_step()
            raise
        finally:
            self._calls -= 1
    return wrapper


def drops_amp_attributes_on_error(step):
    """Wraps an optimizer's ``step``: if it raises, the attributes ``GradScaler.step`` set for it
    go too (:meth:`FlatOptimizer._drop_amp_attributes`)."""
    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        try:
            return step(self, *args, **kwargs)
        except BaseException:
            self._drop_amp_attributes()
            raise
    return wrapper

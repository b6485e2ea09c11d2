"""Where NSO's noise comes from: the Philox seed per rank, and the cursor over draws (the
offset of the current perturbation and of the next), kept on the host and on each device,
rewound when a step is abandoned, and saved in checkpoints so a resumed run draws the same
noise."""
from __future__ import annotations

from .. import distributed as _dist
from .. import ops
from ..rng import counters_per_draw
from .state_dict_checks import unsigned_64

MASK64 = (1 << 64) - 1
_RANK_STRIDE = 0x9E3779B97F4A7C15  # per-rank seeds far apart (golden-ratio increment)


class NoiseCursor:
    """Mixin of :class:`~flatfused.optim.nso.NSO`: ``seed``, ``shared_noise`` and the draw
    offsets. ``_new_draw`` moves to the next perturbation; ``_rng[device]`` is the
    ``(seed, offset)`` tensor the kernels read."""

    def _start_cursor(self) -> None:
        self._next_offset = 0  # offset of the next draw
        self._draw_offset: int | None = None  # offset of the current perturbation

    def _build_rng(self) -> None:
        self._rng = {}
        for b in self._buffers:
            if b.device not in self._rng:
                self._rng[b.device] = ops.rng_state(self._noise_seed(), 0, b.device)
        self._write_draw_offset()

    def _noise_seed(self) -> int:
        if self.shared_noise:
            return self.seed
        return (self.seed + _dist.rank() * _RANK_STRIDE) & MASK64

    def _write_draw_offset(self) -> None:
        """Set the device offsets to the current draw's (outside a step: build, load, rewind)."""
        self._device_offset = self._draw_offset
        if self._draw_offset is not None:
            for t in self._rng.values():
                t[1] = ops._as_int64(self._draw_offset)

    def _rewind_rng(self, position: tuple[int, int | None]) -> None:
        """Go back to ``(next offset, draw offset)`` taken at a step's start: a skipped step's
        noise is drawn again by the next one."""
        self._next_offset, self._draw_offset = position
        self._write_draw_offset()


    def _new_draw(self) -> None:
        self._draw_offset = self._next_offset
        self._next_offset = (self._next_offset + counters_per_draw(self._numel)) & MASK64
        if self._device_offset is None:
            self._write_draw_offset()
        else:
            # Advance on the device by the (constant) distance instead of writing the value
            # from the host: a CUDA graph captured over draws replays the advance, not a
            # fixed offset. int64 addition wraps like the unsigned 64-bit offset.
            advance = ops._as_int64((self._draw_offset - self._device_offset) & MASK64)
            for t in self._rng.values():
                t[1:].add_(advance)
            self._device_offset = self._draw_offset

    def _rng_position(self) -> tuple[int, int | None]:
        """(next offset, current draw offset), from the device when draws ran outside Python's
        view (CUDA graph replays advance only the device offsets)."""
        if self._draw_offset is None or not self._rng:
            return self._next_offset, self._draw_offset
        device_draw = int(next(iter(self._rng.values()))[1]) & MASK64
        if device_draw == self._draw_offset:
            return self._next_offset, self._draw_offset
        return (device_draw + counters_per_draw(self._numel)) & MASK64, device_draw


    def _extra_state(self) -> dict:
        next_offset, draw_offset = self._rng_position()
        return {"seed": self.seed, "next_offset": next_offset, "draw_offset": draw_offset}

    def _check_extra_state(self, extra: dict) -> None:
        if "seed" not in extra:
            raise ValueError("state_dict['flatfused'] has no 'seed': not a checkpoint of "
                             "flatfused.NSO")
        unsigned_64("state_dict['flatfused']['seed']", extra["seed"])
        unsigned_64("state_dict['flatfused']['next_offset']", extra.get("next_offset"))
        unsigned_64("state_dict['flatfused']['draw_offset']", extra.get("draw_offset"),
                    optional=True)


    def _load_extra_state(self, extra: dict) -> None:
        self.seed = int(extra["seed"])
        self._next_offset = int(extra["next_offset"])
        draw = extra.get("draw_offset")
        self._draw_offset = None if draw is None else int(draw)
        self._on_build()  # the RNG tensors now carry the loaded seed and offset

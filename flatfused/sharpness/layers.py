"""Which parameters a Hessian measurement covers, and how they group into layers.

One selector serves the functions (``hessian_trace(..., layers=...)``, ``top_eigenvalues``,
``spectral_density``) and ``flatfused sharpness`` (``--layers``, ``--layer-types``,
``--include``, ``--exclude``, ``--layer-params``), so both select the same parameters::

    from flatfused.sharpness import LayerSelector, hessian_trace

    total, per_layer = hessian_trace(model, loss_fn, data, layers="linear", per_layer=True)
    sel = LayerSelector(types=("Linear",), include=r"encoder\\.", params="all")

Two kinds of selection:

* by **parameter** (``types=None``, the ``"parameters"`` preset, the default): every trainable
  parameter is its own block, named as ``named_parameters()`` names it; ``include``/``exclude``
  match those names.
* by **module** (``types`` given, e.g. the ``"linear"`` preset): a layer is a module whose class,
  or one of its base classes, has one of the ``types`` names; its block is its own trainable
  parameters (``params="weight"``: the weight only, ``"all"``: weight and bias, ...);
  ``include``/``exclude`` match the module's name (``named_modules()``).

Patterns are regular expressions found anywhere in the name (``re.search``). A parameter shared
by several modules (tied weights) belongs to the module that ``named_parameters()`` lists it
under, the first one holding it: GPT-2's ``lm_head`` holds the token embedding's matrix and
so is not a layer of its own.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = ["LayerSelector", "PRESETS", "NO_EMBEDDINGS"]

# The NSO scripts' exclusion: their per-layer traces skip embeddings, LayerNorm and the pooler.
NO_EMBEDDINGS = r"embeddings|LayerNorm|pooler"

PARAMS = ("weight", "all")


@dataclass(frozen=True)
class LayerSelector:
    """Select the parameters (and their grouping into layers) of a Hessian measurement.

    ``types``: module class names (a tuple, or a comma-separated string); ``None`` selects by
    parameter. ``include``/``exclude``: regular expressions (``None`` or ``""``: no filter).
    ``params``: with ``types``, ``"weight"`` (each layer's ``weight``) or ``"all"`` (all its own
    trainable parameters).
    """

    types: Optional[Tuple[str, ...]] = None
    include: Optional[str] = None
    exclude: Optional[str] = None
    params: str = "weight"

    def __post_init__(self):
        types = self.types
        if isinstance(types, str):
            types = tuple(t.strip() for t in types.split(","))
        if types is not None:
            types = tuple(types)
            if not types or any(not isinstance(t, str) or not t.strip() for t in types):
                raise ValueError(f"layer types must be non-empty class names, got {self.types!r}")
            types = tuple(t.strip() for t in types)
            repeated = sorted({t for t in types if types.count(t) > 1})
            if repeated:
                raise ValueError(f"layer types {repeated} given more than once")
        object.__setattr__(self, "types", types)
        for what in ("include", "exclude"):
            pattern = getattr(self, what)
            if pattern is None or pattern == "":
                object.__setattr__(self, what, None)
                continue
            try:
                re.compile(pattern)
            except (re.error, TypeError) as exc:
                raise ValueError(f"{what} pattern {pattern!r} is not a regular expression: "
                                 f"{exc}") from None
        if self.params not in PARAMS:
            raise ValueError(f"params must be one of {PARAMS}, got {self.params!r}")

    # -- presets -----------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "LayerSelector":
        """A named selection (see ``PRESETS``), with some fields replaced."""
        if name not in PRESETS:
            raise ValueError(f"unknown layer preset {name!r}; choose from {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @classmethod
    def coerce(cls, layers) -> "LayerSelector":
        """``layers`` as the functions take it: a selector, or a preset's name."""
        if isinstance(layers, LayerSelector):
            return layers
        if isinstance(layers, str):
            return cls.preset(layers)
        raise TypeError(f"layers must be a LayerSelector or a preset name "
                        f"({', '.join(PRESETS)}), got {type(layers).__name__}")

    @property
    def by_module(self) -> bool:
        return self.types is not None

    def describe(self) -> dict:
        """The selection as JSON-ready settings."""
        return {"types": list(self.types) if self.types else None, "include": self.include,
                "exclude": self.exclude, "params": self.params if self.by_module else None}

    # -- resolving on a model ------------------------------------------------------------
    def _keep(self, name: str) -> bool:
        if self.include is not None and not re.search(self.include, name):
            return False
        return self.exclude is None or not re.search(self.exclude, name)

    def blocks(self, model: torch.nn.Module) -> Dict[str, Tuple[str, ...]]:
        """``{layer name: (parameter names, as named_parameters() gives them)}`` in the model's
        order; ``ValueError`` when nothing is selected, naming what the model has."""
        trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        out: Dict[str, Tuple[str, ...]] = {}
        if not self.by_module:
            out = {n: (n,) for n in trainable.values() if self._keep(n)}
            if not out:
                raise ValueError(f"no parameters selected: none of the {len(trainable)} trainable "
                                 f"parameters matches {self._filters()}")
            return out
        wanted = set(self.types)
        seen_types = set()
        for mname, module in model.named_modules():
            classes = {c.__name__ for c in type(module).__mro__}
            if not classes & wanted:
                continue
            seen_types |= classes & wanted
            if not self._keep(mname):
                continue
            own = []
            for pname, p in module.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                if trainable.get(id(p)) != full:  # frozen, or tied to an earlier module
                    continue
                if self.params == "weight" and pname != "weight":
                    continue
                own.append(full)
            if own:
                out[mname] = tuple(own)
        if not out:
            if not seen_types:
                missing = sorted(wanted)
                present = sorted({type(m).__name__ for m in model.modules()
                                  if any(True for _ in m.parameters(recurse=False))})
                raise ValueError(f"no layers selected: the model has no module of type "
                                 f"{', '.join(missing)} (module types holding parameters: "
                                 f"{', '.join(present)})")
            raise ValueError(f"no layers selected: no {'/'.join(self.types)} module with a "
                             f"trainable {'weight' if self.params == 'weight' else 'parameter'} "
                             f"matches {self._filters()}")
        return out

    def _filters(self) -> str:
        parts = [f"include {self.include!r}" if self.include else "",
                 f"exclude {self.exclude!r}" if self.exclude else ""]
        return " and ".join(p for p in parts if p) or "the selection"

    def param_filter(self, model: torch.nn.Module) -> Callable[[str, torch.Tensor], bool]:
        """A ``param_filter(name, param)`` keeping exactly the selected parameters."""
        names = {n for params in self.blocks(model).values() for n in params}
        return lambda name, param: name in names


# Named selections: "parameters" every trainable parameter on its own; "linear" the weights of
# the Linear layers (and of Hugging Face's Conv1D, GPT-2's linear layer with a transposed
# weight) outside embeddings, LayerNorm and the pooler, the per-layer traces of the NSO papers.
PRESETS: Dict[str, LayerSelector] = {
    "parameters": LayerSelector(),
    "linear": LayerSelector(types=("Linear", "Conv1D"), exclude=NO_EMBEDDINGS, params="weight"),
}

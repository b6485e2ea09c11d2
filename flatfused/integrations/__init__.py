"""Integrations of flatfused's optimizers into third-party training programs.

- :mod:`flatfused.integrations.open_clip`: ``python -m flatfused.integrations.open_clip``, a
  launcher that runs open_clip's own trainer (``open_clip_train``) with NSO, SAM or WSAM chosen
  on the command line (docs/open_clip.md).
- :mod:`flatfused.integrations.transformers`: ``FlatTrainer`` and ``FlatTrainingArguments``,
  the Hugging Face ``Trainer`` with each optimizer step one flatfused ``step(closure)``
  (docs/transformers.md).
- :mod:`flatfused.integrations.accelerate`: ``prepare``, Accelerate's ``prepare`` with
  flatfused's optimizers stepping through ``accelerator.accumulate`` and its ``GradScaler``
  (docs/transformers.md).
- :mod:`flatfused.integrations.lightning`: ``FlatOptimizerCallback``, which lets a
  ``lightning.Trainer`` train with them: precision modes, clipping, accumulation, DDP and
  checkpoints as in a plain run (docs/lightning.md).

Each integration imports its third-party package only when used.
"""

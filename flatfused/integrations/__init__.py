"""Integrations of flatfused's optimizers into third-party training programs.

- :mod:`flatfused.integrations.open_clip`: ``python -m flatfused.integrations.open_clip``, a
  launcher that runs open_clip's own trainer (``open_clip_train``) with NSO, SAM or WSAM chosen
  on the command line (docs/open_clip.md).

Each integration imports its third-party package only when used.
"""

"""Recipe scaffolding for the NSO papers' language-model experiments (see docs/recipes.md).

Importable from the repository root (``from examples.glue_label_noise import load_task``);
not installed with flatfused. Each recipe gives its data and its model; the training scripts
that wire them to flatfused's optimizers come on top.
"""

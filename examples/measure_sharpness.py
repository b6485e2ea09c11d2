"""Per-layer Hessian traces and top eigenvalues of a fine-tuned model, through ``flatfused
sharpness`` (its ``main``, the command itself, run in this process): the NSO papers'
``compute_hessian_traces.py`` measurement, the trace of each Linear layer's weight block
(embeddings, LayerNorm and pooler excluded: ``--layers linear``) and their sum.

The batches are the training set the model was fitted to (labels as trained on, noisy ones
included), written as the tokenised ``.pt`` file that ``--text-data`` reads, so that the
command measures exactly the recipe's sequences.
"""
from __future__ import annotations

import contextlib
import io
import json
import os

import torch

__all__ = ["add_sharpness_flags", "write_text_data", "measure"]


def add_sharpness_flags(parser, batch_size: int, batches: int, probes: int) -> None:
    from flatfused._argtypes import nonnegative, positive

    g = parser.add_argument_group("sharpness of the fine-tuned model (flatfused sharpness)")
    g.add_argument("--hessian-batches", type=nonnegative(int), default=batches,
                   help=f"training batches measured (default {batches}; 0 skips the measurement)")
    g.add_argument("--hessian-batch-size", type=positive(int), default=batch_size,
                   help=f"sequences per measured batch (default {batch_size})")
    g.add_argument("--hessian-probes", type=positive(int), default=probes,
                   help=f"Hutchinson probes of the trace (default {probes})")
    g.add_argument("--hessian-eig-iters", type=positive(int), default=50,
                   help="power iterations of the top eigenvalue (default 50)")
    g.add_argument("--layers", default="linear", choices=("linear", "parameters"),
                   help="per-layer blocks: linear (the papers': Linear/Conv1D weights, no "
                        "embeddings/LayerNorm/pooler; default) or parameters (every parameter)")


def write_text_data(dataset, path: str, count: int) -> str:
    """The first ``count`` rows of a recipe ``TokenizedDataset`` as a ``--text-data`` file."""
    rows = slice(0, min(count, len(dataset)))
    torch.save({"input_ids": dataset.input_ids[rows].clone(),
                "attention_mask": dataset.attention_mask[rows].clone(),
                "labels": dataset.labels[rows].clone()}, path)
    return path


def measure(args, out: str, text_data: str, seed: int, device: str, hf_model: str,
            checkpoint: str | None = None) -> dict:
    """Run ``flatfused sharpness`` on the model (``--hf-model`` directory, and a Lightning
    ``--checkpoint`` over it) and return what the recipe's metrics keep of ``sharpness.json``;
    the command's table goes to ``OUT/sharpness.txt``. Writes ``OUT/sharpness.json``,
    ``OUT/layer_traces.csv`` and ``OUT/sharpness.png``."""
    from flatfused.sharpness import cli

    argv = ["--hf-model", hf_model, "--text-data", text_data,
            "--batch-size", str(args.hessian_batch_size), "--batches", str(args.hessian_batches),
            "--layers", args.layers, "--measure", "trace,eigs", "--probes",
            str(args.hessian_probes), "--top-k", "1", "--eig-iters", str(args.hessian_eig_iters),
            "--seed", str(seed), "--device", device, "--no-progress", "--out", out]
    if checkpoint is not None:
        argv += ["--checkpoint", checkpoint]
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        status = cli.main(argv)
    if status != 0:
        raise RuntimeError(f"flatfused sharpness {' '.join(argv)} failed: "
                           f"{errors.getvalue().strip()}")
    with open(os.path.join(out, "sharpness.txt"), "w", encoding="utf-8") as f:
        f.write("flatfused sharpness " + " ".join(argv) + "\n\n" + printed.getvalue())
    with open(os.path.join(out, "sharpness.json"), encoding="utf-8") as f:
        res = json.load(f)
    return {"hessian_trace": res["trace"]["value"],
            "top_eigenvalue": res["top_eigenvalues"]["values"][0],
            "per_layer_trace": res["trace"]["per_layer"],
            "layers": res["layers"]["count"], "layer_params": res["layers"]["numel"],
            "loss": res["loss"], "samples": res["num_samples"], "probes": res["trace"]["probes"],
            "seconds": sum(res["seconds"].values()),
            "files": {name: os.path.join(out, name) for name in
                      ("sharpness.json", "layer_traces.csv", "sharpness.png", "sharpness.txt")
                      if os.path.exists(os.path.join(out, name))},
            "command": "flatfused sharpness " + " ".join(argv)}

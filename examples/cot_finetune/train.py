"""Chain-of-thought fine-tuning of a causal LM with PyTorch Lightning (``FlatOptimizerCallback``)
and NSO, SAM, ASAM or WSAM around AdamW (or AdamW alone), with mixed precision; then answer
accuracy by greedy decoding of held-out problems, a Lightning checkpoint, and the per-layer
Hessian traces and top eigenvalue of the checkpoint through ``flatfused sharpness
--checkpoint ... --hf-model ...``: the NSO papers' chain-of-thought experiment
(``custom_train.py``, then ``compute_hessian_traces.py``).

Run from the repository root::

    python -m examples.cot_finetune.train                           # tiny defaults, NSO
    python -m examples.cot_finetune.train --compare --seeds 0,1
    python -m examples.cot_finetune.train --model-dir models/gpt2 --tokenizer-dir models/gpt2 \\
        --data-file data/multiarith_cot.jsonl --max-length 512 --lr 1e-4 --optimizer nso,adamw

Without files it trains a tiny GPT-2 (built from a config, character-level tokenizer) on
generated two-step arithmetic; nothing is downloaded. Outputs (docs/recipes.md):
``OUT/<optimizer>-seed<k>/`` with ``metrics.json``, ``last.ckpt``, ``model/`` (the fine-tuned
model, ``save_pretrained``), ``base_model/`` (the tiny model's architecture for ``--hf-model``)
and ``sharpness/``; ``OUT/summary.json`` and ``summary.md``.
"""
from __future__ import annotations

import math
import os
import re
import sys
import time

import torch

from flatfused._argtypes import Parser, nonnegative, output_path, positive

from .. import measure_sharpness, optimizer_flags, runs
from ..text_data import IGNORE_INDEX

PROG = "python -m examples.cot_finetune.train"
# The tiny defaults' radii (docs/recipes.md: not tuned).
RADII = {"nso_sigma": 0.01, "sam_rho": 0.05}
PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed")
# (metrics key, column, format, scale): the summary table's columns
COLUMNS = (("answer_accuracy", "answer acc %", "{:.1f}", 100),
           ("answer_format", "answer given %", "{:.1f}", 100),
           ("token_accuracy", "completion token acc %", "{:.1f}", 100),
           ("eval_loss", "eval loss", "{:.3f}", 1),
           ("train_loss_at_w", "train loss", "{:.3f}", 1),
           ("sharpness.hessian_trace", "Hessian trace (linear)", "{:.4g}", 1),
           ("sharpness.top_eigenvalue", "top eigenvalue", "{:.4g}", 1),
           ("train_seconds", "train s", "{:.0f}", 1))


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    d = p.add_argument_group("data (docs/recipes.md; without --data-file generated arithmetic)")
    d.add_argument("--data-file", help="JSONL of question/rationale/answer")
    d.add_argument("--eval-file", help="held-out JSONL (default: --eval-fraction of the data)")
    d.add_argument("--tokenizer-dir", help="a saved tokenizer, e.g. --model-dir (default: a "
                                           "character-level one built from the data)")
    d.add_argument("--tokenizer-level", choices=("char", "word"), default="char",
                   help="the built tokenizer's level (default char)")
    d.add_argument("--max-length", type=positive(int), default=256,
                   help="tokens per example; longer ones are refused (default 256)")
    d.add_argument("--num-generated", type=positive(int), default=400,
                   help="generated problems, held-out ones included (default 400)")
    d.add_argument("--eval-fraction", type=nonnegative(float), default=0.2,
                   help="problems held out for evaluation (default 0.2)")
    d.add_argument("--data-seed", type=nonnegative(int), default=0,
                   help="seed of the generated problems and the split (default 0)")
    d.add_argument("--train-on-prompt", action="store_true",
                   help="learn the question too (default: the rationale and answer only)")
    m = p.add_argument_group("model and training (AdamW: no weight decay on biases and "
                             "LayerNorms, linear warmup and decay)")
    m.add_argument("--model-dir", help="a local model directory (save_pretrained); default: a "
                                       "tiny GPT-2 built from a config")
    m.add_argument("--tiny-size", metavar="WIDTH,LAYERS,HEADS",
                   help="the tiny GPT-2's width, layers and heads (default 64,2,4)")
    m.add_argument("--epochs", type=positive(int), default=20, help="epochs (default 20)")
    m.add_argument("--max-steps", type=positive(int), help="optimizer steps, instead of --epochs")
    m.add_argument("--batch-size", type=positive(int), default=16, help="micro-batch (default 16)")
    m.add_argument("--grad-accum", type=positive(int), default=1,
                   help="micro-batches per optimizer step, accumulate_grad_batches (default 1)")
    m.add_argument("--lr", type=positive(float), default=3e-3, help="peak learning rate (3e-3)")
    m.add_argument("--weight-decay", type=nonnegative(float), default=0.01,
                   help="AdamW weight decay (default 0.01)")
    m.add_argument("--warmup", type=nonnegative(float), default=0.06,
                   help="warmup: a fraction of the steps if < 1, else steps (default 0.06)")
    m.add_argument("--max-grad-norm", type=nonnegative(float), default=1.0,
                   help="gradient_clip_val, by norm (0: off; default 1.0)")
    m.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: 16-mixed on a GPU, bf16-mixed on a CPU; 16-mixed on a CPU runs "
                        "fp16 autocast with a CPU GradScaler (default auto)")
    m.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available (default)")
    m.add_argument("--threads", type=positive(int), default=1,
                   help="torch threads on the CPU (default 1: a tiny model gains nothing from "
                        "more, and on a shared machine they spin)")
    m.add_argument("--seeds", default="0", help="training seeds, comma-separated: "
                                                 "initialisation, batch order, NSO noise (0)")
    m.add_argument("--max-new-tokens", type=positive(int),
                   help="greedy decoding's limit (default: the longest training completion "
                        "+ 16)")
    optimizer_flags.add_optimizer_flags(p, RADII)
    measure_sharpness.add_sharpness_flags(p, batch_size=16, batches=1, probes=30)
    p.add_argument("--out", type=output_path(directory=True,
                                             files=runs.OUTPUT_FILES),
                   default="runs/cot_finetune", help="output directory (default "
                                                     "runs/cot_finetune)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    return p


def tiny_size(text, model_dir) -> dict:
    if text is None:
        text = "64,2,4"
    elif model_dir is not None:
        raise SystemExit("--tiny-size sizes the tiny model; --model-dir gives its own")
    try:
        width, layers, heads = (int(s) for s in text.split(","))
    except ValueError:
        raise SystemExit(f"--tiny-size: WIDTH,LAYERS,HEADS integers, got {text!r}") from None
    if min(width, layers, heads) < 1 or width % heads:
        raise SystemExit(f"--tiny-size: positive, and the width a multiple of the heads, got "
                         f"{text!r}")
    return {"n_embd": width, "n_layer": layers, "n_head": heads}


def load_data(args):
    from . import load_cot_data

    if args.data_file is None and not args.eval_fraction > 0:
        raise SystemExit("--eval-fraction must be > 0 without --eval-file: the experiment "
                         "decodes held-out problems")
    if args.data_file is not None and args.eval_file is None and not args.eval_fraction > 0:
        raise SystemExit("pass --eval-file or an --eval-fraction > 0: the experiment decodes "
                         "held-out problems")
    kwargs = dict(data_file=args.data_file, eval_file=args.eval_file,
                  tokenizer_dir=args.tokenizer_dir, tokenizer_level=args.tokenizer_level,
                  max_length=args.max_length, num_generated=args.num_generated,
                  eval_fraction=args.eval_fraction, seed=args.data_seed,
                  train_on_prompt=args.train_on_prompt)
    try:
        data = load_cot_data(**kwargs)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if data.eval is None:
        raise SystemExit("no held-out problems: raise --eval-fraction or pass --eval-file")
    return data


def precision_of(args, device: str) -> str:
    if args.precision == "auto":
        return "16-mixed" if device == "cuda" else "bf16-mixed"
    return args.precision


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        seeds = runs.seeds_flag(args.seeds)
        kinds, options = optimizer_flags.optimizer_settings(args, RADII)
        sizes = tiny_size(args.tiny_size, args.model_dir)
        if args.model_dir is not None and args.tokenizer_dir is None:
            raise SystemExit("--model-dir needs --tokenizer-dir (the model's own tokenizer, "
                             "usually the same directory): its embeddings need its vocabulary")
        device = runs.device_of(args.device)
        precision = precision_of(args, device)
        _quiet()
        torch.set_num_threads(args.threads)
        data = load_data(args)
    except SystemExit as exc:
        return runs.refused(PROG, exc)
    started = time.time()
    print(f"data: {data.source}; {len(data.train)} training and {len(data.eval)} held-out "
          f"problems, {data.train.input_ids.shape[1]} tokens per padded row; precision "
          f"{precision} on {device}")
    results = []
    for kind in kinds:
        for seed in seeds:
            results.append(run(data, kind, seed, options, args, device, precision, sizes))
    return runs.finish(results, COLUMNS, args.out, f"Chain-of-thought fine-tuning: "
                       f"{data.source}, precision {precision}", PROG, argv, started)


def _quiet() -> None:
    """No info lines, progress bars or advice for tiny runs from Lightning and transformers."""
    import logging
    import warnings

    import lightning  # noqa: F401  (sets its loggers' levels on import)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in (".*does not have many workers.*", ".*GPU available but not used.*",
                    ".*LeafSpec.*", ".*treespec.*"):
        warnings.filterwarnings("ignore", message)


# ------------------------------------------------------------------------------- training

def lightning_module(model, kind: str, options: dict, args, total_steps: int, seed: int):
    """The LightningModule: the causal LM as ``self.model`` (its Lightning checkpoint keys
    start with ``model.``), the loss of ``model(**batch)``, AdamW (wrapped by ``kind``) with
    a linear warmup and decay stepped per optimizer step."""
    import lightning as L

    warmup = args.warmup if args.warmup >= 1 else args.warmup * total_steps

    class CoTModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model
            self.train_losses, self.eval_losses = [], []  # this epoch's, for _epoch_lines

        def training_step(self, batch, batch_idx):
            loss = self.model(**batch).loss
            # every pass and micro-batch of a flatfused step calls this: the epoch's mean is
            # over all of them (NSO's perturbed passes, SAM's both)
            self.train_losses.append(float(loss.detach()))
            return loss

        def validation_step(self, batch, batch_idx):
            self.eval_losses.append((float(self.model(**batch).loss),
                                     int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())))

        def configure_optimizers(self):
            decay = [p for n, p in self.model.named_parameters()
                     if p.requires_grad and not _no_decay(n)]
            rest = [p for n, p in self.model.named_parameters()
                    if p.requires_grad and _no_decay(n)]
            base = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=args.lr)
            optimizer = optimizer_flags.build_optimizer(kind, options, base, self, None, seed)

            def schedule(step):
                if step < warmup:
                    return (step + 1) / (warmup + 1)
                return max(0.0, (total_steps - step) / max(1.0, total_steps - warmup))

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    return CoTModule()


def _no_decay(name: str) -> bool:
    """The Trainer's rule: no weight decay on biases and LayerNorm weights (GPT-2's ln_*)."""
    return name.endswith(".bias") or ".ln_" in name or "layernorm" in name.lower()


def make_trainer(args, device: str, precision: str, callbacks):
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    from flatfused.integrations.lightning import FlatOptimizerCallback

    plugins = []
    if precision == "16-mixed" and device == "cpu":
        # Lightning runs "16-mixed" on a CPU as bf16; fp16 autocast with a GradScaler on the
        # CPU is what it runs on a GPU (docs/lightning.md, "Mixed precision").
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
        precision = None
    return L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                     precision=precision, plugins=plugins,
                     max_epochs=args.epochs if args.max_steps is None else -1,
                     max_steps=args.max_steps or -1,
                     gradient_clip_val=args.max_grad_norm or None,
                     accumulate_grad_batches=args.grad_accum, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0,
                     callbacks=[FlatOptimizerCallback(), *callbacks])


def run(data, kind: str, seed: int, options: dict, args, device: str, precision: str,
        sizes: dict) -> dict:
    """Train ``kind`` with ``seed``, evaluate, checkpoint and measure; the run's metrics (also
    written to ``metrics.json``)."""
    import lightning as L

    from . import load_model

    out = runs.run_dir(args.out, kind, seed)
    os.makedirs(out, exist_ok=True)
    L.seed_everything(seed, verbose=False)
    model = load_model(data, args.model_dir, seed=seed,
                       **({} if args.model_dir is not None else sizes))
    model.train()  # from_pretrained gives eval mode, which Lightning keeps (no dropout)
    base_dir = args.model_dir
    if base_dir is None:  # the architecture flatfused sharpness rebuilds the checkpoint into
        base_dir = os.path.join(out, "base_model")
        model.save_pretrained(base_dir)
        data.tokenizer.save_pretrained(base_dir)
    generator = torch.Generator().manual_seed(seed)
    train_loader = torch.utils.data.DataLoader(data.train, batch_size=args.batch_size,
                                               shuffle=True, generator=generator)
    eval_loader = torch.utils.data.DataLoader(data.eval, batch_size=args.batch_size)
    per_epoch = math.ceil(len(train_loader) / args.grad_accum)
    total = args.max_steps or per_epoch * args.epochs
    module = lightning_module(model, kind, options, args, total, seed)
    passes = runs.count_training_forwards(model)
    history = []
    trainer = make_trainer(args, device, precision,
                           [_epoch_lines(f"{kind} seed {seed}", history, args.quiet)])
    t = time.perf_counter()
    trainer.fit(module, train_loader, eval_loader)
    train_seconds = time.perf_counter() - t
    checkpoint = os.path.join(out, "last.ckpt")
    trainer.save_checkpoint(checkpoint)
    model_dir = os.path.join(out, "model")
    model.save_pretrained(model_dir)
    data.tokenizer.save_pretrained(model_dir)
    metrics = {"optimizer": kind, "seed": seed, "dir": out,
               "radius": optimizer_flags.radius(kind, options),
               "options": optimizer_flags.owned(kind, options) if kind != "adamw" else {},
               "steps": trainer.global_step, "epochs": trainer.current_epoch,
               "forward_passes": passes[0], "train_seconds": train_seconds,
               "precision": precision, "device": device, "history": history,
               "checkpoint": checkpoint, "model_dir": model_dir, "base_model_dir": base_dir}
    model.to(device)
    metrics.update(evaluate(model, data, args, device))
    if args.hessian_batches:
        sharp = os.path.join(out, "sharpness")
        os.makedirs(sharp, exist_ok=True)
        text = measure_sharpness.write_text_data(
            data.train, os.path.join(out, "hessian_data.pt"),
            args.hessian_batches * args.hessian_batch_size)
        metrics["sharpness"] = measure_sharpness.measure(args, sharp, text, seed, device,
                                                         base_dir, checkpoint)
    runs.write_json(os.path.join(out, "metrics.json"), metrics)
    if not args.quiet:
        sharp = metrics.get("sharpness", {})
        print(f"[{kind} seed {seed}] answer accuracy {100 * metrics['answer_accuracy']:.1f}% "
              f"(answer given {100 * metrics['answer_format']:.0f}%), completion tokens "
              f"{100 * metrics['token_accuracy']:.1f}%, eval loss {metrics['eval_loss']:.3f}"
              + (f", Hessian trace {sharp['hessian_trace']:.4g}, top eigenvalue "
                 f"{sharp['top_eigenvalue']:.4g}" if sharp else "")
              + f" ({train_seconds:.0f} s training)", flush=True)
    return metrics


def _epoch_lines(name: str, history: list, quiet: bool):
    """A callback recording (and printing) each epoch's mean training-step loss and the
    held-out loss (per token, as the model's loss is)."""
    import lightning as L

    class EpochLines(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            row = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step}
            if module.train_losses:
                row["train_loss_passes"] = sum(module.train_losses) / len(module.train_losses)
            if module.eval_losses:  # validation ran at this epoch's end, before this hook
                tokens = sum(n for _, n in module.eval_losses)
                row["eval_loss"] = sum(loss * n for loss, n in module.eval_losses) / tokens
            module.train_losses.clear()
            module.eval_losses.clear()
            history.append(row)
            if not quiet:
                print(f"  [{name}] epoch {row['epoch']}: train loss (passes' mean) "
                      f"{row.get('train_loss_passes', float('nan')):.3f}, eval loss "
                      f"{row.get('eval_loss', float('nan')):.3f}", flush=True)

    return EpochLines()


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def _teacher_forced(model, dataset, batch_size: int, device: str):
    """(mean loss over the labelled tokens, next-token accuracy over them) in eval mode."""
    model.eval()
    total = correct = 0
    loss_sum = 0.0
    for start in range(0, len(dataset), batch_size):
        rows = slice(start, start + batch_size)
        ids = dataset.input_ids[rows].to(device)
        logits = model(input_ids=ids,
                       attention_mask=dataset.attention_mask[rows].to(device)).logits.float()
        labels = dataset.labels[rows].to(device)[:, 1:]
        logits = logits[:, :-1]
        counted = labels != IGNORE_INDEX
        loss_sum += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum"))
        correct += int(((logits.argmax(-1) == labels) & counted).sum())
        total += int(counted.sum())
    return loss_sum / max(total, 1), correct / max(total, 1)


def prompts(data, examples):
    """Each example's prompt ids, exactly as the training rows begin (``<s>`` and the
    question, up to the first labelled token)."""
    from .data import tokenize_examples

    ids, labels = tokenize_examples(examples, data.tokenizer, data.max_length)
    out = []
    for row, lab in zip(ids, labels):
        first = next(i for i, t in enumerate(lab) if t != IGNORE_INDEX)
        out.append(row[:first])
    return out


@torch.no_grad()
def greedy_decode(model, prompt_ids, max_new: int, eos: int, pad: int, device: str,
                  batch_size: int):
    """Greedy continuations (token ids without the prompt, cut at ``eos``); prompts of one
    length are batched together, so that no padding shifts their positions."""
    model.eval()
    limit = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    out = [None] * len(prompt_ids)
    by_length = {}
    for i, p in enumerate(prompt_ids):
        by_length.setdefault(len(p), []).append(i)
    for length, rows in by_length.items():
        steps = min(max_new, limit - length)
        for start in range(0, len(rows), batch_size):
            group = rows[start:start + batch_size]
            ids = torch.tensor([prompt_ids[i] for i in group], device=device)
            if steps < 1:
                tokens = [[] for _ in group]
            else:
                tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=steps, do_sample=False,
                                        eos_token_id=eos, pad_token_id=pad)[:, length:].tolist()
            for i, row in zip(group, tokens):
                out[i] = row[:row.index(eos)] if eos in row else row
    return out


_ANSWER = re.compile(r"answer is\s*(.+?)\s*\.?\s*$", re.IGNORECASE | re.DOTALL)


def parse_answer(text: str):
    """The answer of a completion ``... The answer is X.`` (None when it gives none)."""
    at = text.lower().rfind("answer is")
    if at < 0:
        return None
    match = _ANSWER.match(text[at:])
    return _normal(match.group(1)) if match else None


def _normal(answer: str) -> str:
    answer = " ".join(answer.strip().rstrip(".").split()).lower()
    try:
        return repr(float(answer.replace(",", "").replace(" ", "")))
    except ValueError:
        return answer


def evaluate(model, data, args, device: str) -> dict:
    """Teacher-forced loss and next-token accuracy over the labelled tokens (held-out and
    training rows), and greedy decoding of every held-out question: the fraction whose
    completion states the right answer, and the fraction that states one at all."""
    t = time.perf_counter()
    model.float()
    eval_loss, token_accuracy = _teacher_forced(model, data.eval, args.batch_size, device)
    train_loss, train_tokens = _teacher_forced(model, data.train, args.batch_size, device)
    completion = int((data.train.labels != IGNORE_INDEX).sum(1).max())
    max_new = args.max_new_tokens or completion + 16
    tok = data.tokenizer
    outputs = greedy_decode(model, prompts(data, data.eval_examples), max_new,
                            tok.eos_token_id, tok.pad_token_id, device, args.batch_size)
    texts = [tok.decode(o, skip_special_tokens=True) for o in outputs]
    given = [parse_answer(t) for t in texts]
    right = [g is not None and g == _normal(ex.answer)
             for g, ex in zip(given, data.eval_examples)]
    samples = [{"question": ex.question, "answer": ex.answer, "generated": text}
               for ex, text in list(zip(data.eval_examples, texts))[:5]]
    return {"eval_loss": eval_loss, "token_accuracy": token_accuracy,
            "train_loss_at_w": train_loss, "train_token_accuracy": train_tokens,
            "answer_accuracy": sum(right) / len(right),
            "answer_format": sum(g is not None for g in given) / len(given),
            "eval_problems": len(right), "max_new_tokens": max_new, "samples": samples,
            "eval_seconds": time.perf_counter() - t}


if __name__ == "__main__":
    sys.exit(main())

"""Fine-tune a sequence classifier on labels with noise through the Hugging Face Trainer
(``FlatTrainer``, AdamW as the base), with NSO, SAM, ASAM or WSAM against plain AdamW, then
measure the fine-tuned model's per-layer Hessian traces and top eigenvalue with ``flatfused
sharpness``: the NSO papers' GLUE label-noise experiment (``train_glue_label_noise.py``, then
``compute_hessian_traces.py``).

Run from the repository root::

    python -m examples.glue_label_noise.train                      # tiny defaults, NSO
    python -m examples.glue_label_noise.train --compare --seeds 0,1,2
    python -m examples.glue_label_noise.train --model-dir models/roberta-base \\
        --train-file glue/RTE/train.tsv --eval-file glue/RTE/dev.tsv --task rte \\
        --noise-rate 0.2 --lr 2e-5 --epochs 10 --batch-size 16 --optimizer adamw,nso

Without files it trains a tiny RoBERTa (built from a config) on a generated task; nothing is
downloaded. Outputs (docs/recipes.md): ``OUT/<optimizer>-seed<k>/`` with ``metrics.json``,
``model/`` (``save_pretrained``, with its tokenizer) and ``sharpness/`` (``sharpness.json``,
``layer_traces.csv``, ``sharpness.png``), and ``OUT/summary.json``/``summary.md``, the table of
every run.
"""
from __future__ import annotations

import os
import sys
import time

import torch

from flatfused._argtypes import Parser, nonnegative, output_path, positive

from .. import measure_sharpness, optimizer_flags, runs

PROG = "python -m examples.glue_label_noise.train"
# The tiny defaults' radii (docs/recipes.md: not tuned); the library's defaults (sigma 0.008,
# rho 0.05) are set for pretrained models at fine-tuning learning rates.
RADII = {"nso_sigma": 0.02, "sam_rho": 0.05}
# (metrics key, column, format, scale): the summary table's columns
COLUMNS = (("test_accuracy", "test acc % (clean)", "{:.1f}", 100),
           ("noisy_memorised", "noisy labels fit %", "{:.1f}", 100),
           ("train_loss_at_w", "train loss (noisy labels)", "{:.3f}", 1),
           ("sharpness.hessian_trace", "Hessian trace (linear)", "{:.4g}", 1),
           ("sharpness.top_eigenvalue", "top eigenvalue", "{:.4g}", 1),
           ("train_seconds", "train s", "{:.0f}", 1))


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    d = p.add_argument_group("data (docs/recipes.md; without --train-file a generated task)")
    d.add_argument("--train-file", help="GLUE train.tsv, or a labelled .tsv/.csv")
    d.add_argument("--eval-file", help="the clean evaluation file (GLUE dev.tsv)")
    d.add_argument("--task", help="the GLUE task of the files (rte, sst2, mnli, ...)")
    d.add_argument("--text-columns", help="a labelled file's text column(s), comma-separated")
    d.add_argument("--label-column", help="a labelled file's label column")
    d.add_argument("--label-names", help="the classes in order, comma-separated")
    d.add_argument("--tokenizer-dir", help="a saved tokenizer (default: --model-dir's, else "
                                           "a word-level one built from the data)")
    d.add_argument("--max-length", type=positive(int), default=128,
                   help="tokens per sequence (default 128)")
    d.add_argument("--num-generated", type=positive(int), default=2000,
                   help="generated sentences, eval held out included (default 2000)")
    d.add_argument("--num-classes", type=positive(int), default=4,
                   help="generated task's classes, 2 to 4 (default 4)")
    d.add_argument("--eval-fraction", type=positive(float), default=0.2,
                   help="generated sentences held out for evaluation (default 0.2)")
    d.add_argument("--noise-rate", type=nonnegative(float), default=0.4,
                   help="fraction of training labels corrupted (default 0.4)")
    d.add_argument("--noise-mode", choices=("flip", "random"), default="flip",
                   help="flip: another class; random: any class, maybe its own (default flip)")
    d.add_argument("--data-seed", type=nonnegative(int), default=0,
                   help="seed of the generated task and the noise, the same for every run "
                        "(default 0)")
    m = p.add_argument_group("model and training (the Trainer's AdamW: no weight decay on "
                             "biases and LayerNorms, linear schedule)")
    m.add_argument("--model-dir", help="a local model directory (save_pretrained); default: a "
                                       "tiny RoBERTa built from a config")
    m.add_argument("--epochs", type=positive(float), default=30, help="epochs (default 30)")
    m.add_argument("--max-steps", type=positive(int), help="optimizer steps, instead of --epochs")
    m.add_argument("--batch-size", type=positive(int), default=32, help="micro-batch (default 32)")
    m.add_argument("--grad-accum", type=positive(int), default=1,
                   help="micro-batches per optimizer step (default 1)")
    m.add_argument("--lr", type=positive(float), default=2e-3, help="peak learning rate (2e-3)")
    m.add_argument("--weight-decay", type=nonnegative(float), default=0.01,
                   help="AdamW weight decay (default 0.01)")
    m.add_argument("--warmup", type=nonnegative(float), default=0.06,
                   help="warmup: a fraction of the steps if < 1, else steps (default 0.06)")
    m.add_argument("--max-grad-norm", type=nonnegative(float), default=1.0,
                   help="clipping, inside the flatfused step after unscaling (0: off; 1.0)")
    m.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="fp16 (GradScaler) needs a CUDA GPU (default fp32)")
    m.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available (default)")
    m.add_argument("--threads", type=positive(int), default=1,
                   help="torch threads on the CPU (default 1: a tiny model gains nothing from "
                        "more, and on a shared machine they spin)")
    m.add_argument("--seeds", default="0", help="training seeds, comma-separated: model "
                                                 "initialisation, batch order, NSO noise (0)")
    optimizer_flags.add_optimizer_flags(p, RADII)
    measure_sharpness.add_sharpness_flags(p, batch_size=64, batches=2, probes=50)
    p.add_argument("--out", type=output_path(directory=True,
                                             files=runs.OUTPUT_FILES),
                   default="runs/glue_label_noise", help="output directory "
                                                         "(default runs/glue_label_noise)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    return p


def _split(text):
    return None if text is None else tuple(s.strip() for s in text.split(",") if s.strip())


def load_data(args):
    """The task, or ``SystemExit`` with the data module's one-line reason."""
    from . import load_task

    if args.train_file is not None and args.eval_file is None:
        raise SystemExit("--train-file needs --eval-file: the experiment measures accuracy on "
                         "clean labels (the task's dev.tsv)")
    if args.train_file is None and not args.eval_fraction < 1:
        raise SystemExit(f"--eval-fraction must be < 1, got {args.eval_fraction}")
    if args.noise_rate > 1:
        raise SystemExit(f"--noise-rate must be in [0, 1], got {args.noise_rate}")
    kwargs = dict(tokenizer_dir=args.tokenizer_dir, model_dir=args.model_dir,
                  noise_rate=args.noise_rate, noise_mode=args.noise_mode, seed=args.data_seed,
                  max_length=args.max_length)
    if args.train_file is None:
        kwargs.update(num_generated=args.num_generated, num_classes=args.num_classes,
                      eval_fraction=args.eval_fraction)
    else:
        kwargs.update(train_file=args.train_file, eval_file=args.eval_file, task=args.task,
                      text_columns=_split(args.text_columns), label_column=args.label_column,
                      label_names=_split(args.label_names))
    try:
        return load_task(**kwargs)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        seeds = runs.seeds_flag(args.seeds)
        kinds, options = optimizer_flags.optimizer_settings(args, RADII)
        device = runs.device_of(args.device)
        if args.precision == "fp16" and device != "cuda":
            raise SystemExit("--precision fp16 needs a CUDA GPU (on a CPU accelerate makes no "
                             "GradScaler and trains in fp32): use bf16 or fp32")
        _quiet()
        torch.set_num_threads(args.threads)
        task = load_data(args)
    except SystemExit as exc:
        return runs.refused(PROG, exc)
    started = time.time()
    print(f"data: {task.source}; {len(task.train)} training sequences ({len(task.noisy_indices)} "
          f"labels drawn for noise, mode {task.noise_mode}), {len(task.eval)} clean evaluation "
          f"sequences, {task.num_labels} classes")
    results = []
    for kind in kinds:
        for seed in seeds:
            results.append(run(task, kind, seed, options, args, device))
    return runs.finish(results, COLUMNS, args.out, f"Label-noise fine-tuning: {task.source}, "
                       f"noise {task.noise_rate:g} ({task.noise_mode})", PROG, argv, started)


def _quiet() -> None:
    """No info logs or progress bars from transformers/accelerate: the recipe prints its own
    lines."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("accelerate", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run(task, kind: str, seed: int, options: dict, args, device: str) -> dict:
    """Train ``kind`` with ``seed``, evaluate, save the model and measure its sharpness; the
    run's metrics (also written to ``metrics.json``)."""
    from transformers import PrinterCallback

    from flatfused.integrations.transformers import FlatTrainer, FlatTrainingArguments

    from . import load_model

    out = runs.run_dir(args.out, kind, seed)
    os.makedirs(out, exist_ok=True)
    model = load_model(task, args.model_dir, seed=seed)
    # the saved config names the task's classes (pipelines and users read them there)
    model.config.id2label = dict(enumerate(task.label_names))
    model.config.label2id = {name: i for i, name in enumerate(task.label_names)}
    passes = runs.count_training_forwards(model)
    fields = optimizer_flags.trainer_fields(kind, options, seed)
    targs = FlatTrainingArguments(
        output_dir=out, seed=seed, data_seed=seed,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1, learning_rate=args.lr, weight_decay=args.weight_decay,
        lr_scheduler_type="linear", warmup_steps=args.warmup, max_grad_norm=args.max_grad_norm,
        bf16=args.precision == "bf16", fp16=args.precision == "fp16",
        use_cpu=device == "cpu", eval_strategy="epoch", logging_strategy="epoch",
        save_strategy="no", report_to=[], disable_tqdm=True, log_level="error", **fields)
    trainer = FlatTrainer(model=model, args=targs, train_dataset=task.train,
                          eval_dataset=task.eval, compute_metrics=_accuracy)
    trainer.remove_callback(PrinterCallback)
    if not args.quiet:
        trainer.add_callback(epoch_lines(f"{kind} seed {seed}"))
    t = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - t
    metrics = {"optimizer": kind, "seed": seed, "dir": out,
               "radius": optimizer_flags.radius(kind, options),
               "options": optimizer_flags.owned(kind, options) if kind != "adamw" else {},
               "steps": trainer.state.global_step, "epochs": trainer.state.epoch,
               "forward_passes": passes[0], "train_seconds": train_seconds,
               "train_loss": result.training_loss,
               "train_loss_kind": _loss_kind(kind, options),
               "precision": args.precision, "device": device}
    metrics.update(evaluate(trainer.model, task, args.batch_size, device))
    metrics["history"] = [{k: h[k] for k in ("epoch", "eval_loss", "eval_accuracy") if k in h}
                          for h in trainer.state.log_history if "eval_accuracy" in h]
    model_dir = os.path.join(out, "model")
    trainer.model.save_pretrained(model_dir)
    task.tokenizer.save_pretrained(model_dir)
    metrics["model_dir"] = model_dir
    if args.hessian_batches:
        sharp = os.path.join(out, "sharpness")
        os.makedirs(sharp, exist_ok=True)
        data = measure_sharpness.write_text_data(
            task.train, os.path.join(out, "hessian_data.pt"),
            args.hessian_batches * args.hessian_batch_size)
        metrics["sharpness"] = measure_sharpness.measure(args, sharp, data, seed, device,
                                                         model_dir)
    runs.write_json(os.path.join(out, "metrics.json"), metrics)
    if not args.quiet:
        sharp = metrics.get("sharpness", {})
        print(f"[{kind} seed {seed}] test accuracy {100 * metrics['test_accuracy']:.1f}%, noisy "
              f"labels fit {100 * metrics['noisy_memorised']:.1f}%, train loss "
              f"{metrics['train_loss_at_w']:.3f}"
              + (f", Hessian trace {sharp['hessian_trace']:.4g}, top eigenvalue "
                 f"{sharp['top_eigenvalue']:.4g}" if sharp else "")
              + f" ({train_seconds:.0f} s training)")
    return metrics


def _loss_kind(kind: str, options: dict) -> str:
    """Which loss the Trainer's ``train_loss`` averages (docs/transformers.md, "Which loss is
    logged"): NSO without a clean pass logs its perturbed passes' mean, the others the loss at
    the weights (SAM/WSAM: their first pass)."""
    if kind == "nso" and options["nso_lam"] == 0:
        return "perturbed"
    return "clean"


def _accuracy(prediction):
    logits, labels = prediction
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


@torch.no_grad()
def _logits(model, dataset, batch_size, device):
    model.eval()
    out = []
    for start in range(0, len(dataset), batch_size):
        rows = slice(start, start + batch_size)
        out.append(model(input_ids=dataset.input_ids[rows].to(device),
                         attention_mask=dataset.attention_mask[rows].to(device)).logits.float().cpu())
    return torch.cat(out)


def evaluate(model, task, batch_size: int, device: str) -> dict:
    """At the final weights, in eval mode: accuracy on the clean evaluation labels; the loss
    and accuracy on the training labels as trained (noisy); of the training labels the noise
    changed, the fraction predicted as the noisy label (memorised) and as the true one."""
    f = torch.nn.functional
    test = _logits(model, task.eval, batch_size, device)
    train = _logits(model, task.train, batch_size, device)
    noisy, clean = task.train.labels, task.clean_labels
    pred = train.argmax(-1)
    changed = noisy != clean
    kept = ~changed

    def frac(mask):
        return float(mask.float().mean()) if mask.numel() else float("nan")

    return {"test_accuracy": frac(test.argmax(-1) == task.eval.labels),
            "test_loss": float(f.cross_entropy(test, task.eval.labels)),
            "train_loss_at_w": float(f.cross_entropy(train, noisy)),
            "train_accuracy_noisy_labels": frac(pred == noisy),
            "train_accuracy_true_labels": frac(pred == clean),
            "noisy_labels": int(changed.sum()),
            "noisy_memorised": frac(pred[changed] == noisy[changed]),
            "noisy_corrected": frac(pred[changed] == clean[changed]),
            "clean_labels_fit": frac(pred[kept] == clean[kept])}


def epoch_lines(name: str):
    """A TrainerCallback printing one line per evaluated epoch."""
    from transformers import TrainerCallback

    class EpochLines(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            losses = [h for h in state.log_history if "loss" in h]
            loss = f"train loss {losses[-1]['loss']:.3f}, " if losses else ""
            print(f"  [{name}] epoch {state.epoch:.0f}: {loss}eval accuracy "
                  f"{100 * metrics['eval_accuracy']:.1f}%", flush=True)

    return EpochLines()


if __name__ == "__main__":
    sys.exit(main())

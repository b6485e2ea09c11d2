"""Time a Hugging Face Trainer step: flatfused's NSO in FlatTrainer against the plain Trainer's
AdamW, on a tiny RoBERTa built from a config (nothing is downloaded), on the CPU.

    python bench/bench_trainer.py --rounds 15 --steps 16 --threads 1
    # -> bench/results/trainer_roberta_tiny_cpu_<cpu>.json (or --output PATH)

Contenders (the same TrainingArguments: AdamW lr 1e-4, weight decay 0.01 off biases and
LayerNorms, linear decay, max_grad_norm 1.0, the Trainer's default ``optim``):

- ``adamw``: ``transformers.Trainer``, one forward-backward per micro-batch and the Trainer's
  clip and ``optimizer.step()``;
- ``nso``: ``FlatTrainer`` with ``flat_optimizer="nso"`` (sigma 0.008, K 1, w+u and w-u,
  lam 0): two forward-backward passes per micro-batch in one ``optimizer.step(closure)``,
  clipping inside the step; ``sam``, ``wsam`` likewise (two passes).

Each round trains every contender from the same initial weights on the same data for
``--steps`` optimizer steps, the Trainers side by side in threads that take their steps in
turn (AdamW's step 1, NSO's step 1, AdamW's step 2, ...; the order alternates between
rounds), and times each step from the Trainer's ``on_step_begin`` to ``on_step_end`` (the
passes, clipping, the optimizer step, the scheduler and ``zero_grad``; not data loading,
logging or setup); the first ``--warmup`` steps of each run are dropped. Paired: each step's
time over AdamW's step of the same index, taken just before or after it, so that a load change
on a shared machine hits both. Reported: each contender's median step and the median of the
paired ratios, over all rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from flatfused._argtypes import Parser, comma_list, output_path, positive

CONTENDERS = ("adamw", "nso", "sam", "wsam")
RESULTS = Path(__file__).resolve().parent / "results"
FLAT = {"nso": {"nso_sigma": 0.008}, "sam": {"sam_rho": 0.05},
        "wsam": {"sam_rho": 0.05, "wsam_gamma": 0.9}}


def build_parser() -> Parser:
    p = Parser(prog="bench/bench_trainer.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--contenders", default="adamw,nso",
                   help=f"comma-separated, from {', '.join(CONTENDERS)} (adamw is the baseline, "
                        "always run)")
    p.add_argument("--rounds", type=positive(int), default=7, help="paired rounds (7)")
    p.add_argument("--steps", type=positive(int), default=12,
                   help="optimizer steps per run (12)")
    p.add_argument("--warmup", type=int, default=2, help="steps dropped from each run (2)")
    p.add_argument("--batch", type=positive(int), default=8, help="micro-batch size (8)")
    p.add_argument("--accum", type=positive(int), default=1,
                   help="gradient_accumulation_steps (1)")
    p.add_argument("--seq", type=positive(int), default=64, help="tokens per example (64)")
    p.add_argument("--hidden", type=positive(int), default=64, help="RoBERTa width (64)")
    p.add_argument("--layers", type=positive(int), default=2, help="RoBERTa layers (2)")
    p.add_argument("--heads", type=positive(int), default=4, help="attention heads (4)")
    p.add_argument("--vocab", type=positive(int), default=1000, help="vocabulary size (1000)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=positive(int), default=None,
                   help="torch CPU threads (default: torch's)")
    p.add_argument("--output", type=output_path(), default=None,
                   help="the JSON record (default bench/results/trainer_roberta_tiny_cpu_<cpu>"
                        ".json; checked before anything is measured)")
    return p


def check(p: Parser, a) -> list[str]:
    try:
        contenders = comma_list(a.contenders, CONTENDERS, "--contenders")
    except SystemExit as e:
        p.error(str(e))
    if a.warmup < 0 or a.warmup >= a.steps:
        p.error(f"--warmup must be in [0, --steps), got {a.warmup} with --steps {a.steps}")
    if a.hidden % a.heads:
        p.error(f"--hidden {a.hidden} must be a multiple of --heads {a.heads}")
    return ["adamw"] + [c for c in contenders if c != "adamw"]


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(3, vocab, (n, seq), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i]}


class Turns:
    """The Trainers of a round train in threads and take their optimizer steps in turn, one
    step each in a fixed order while the others wait, so that the steps compared meet the same
    load (on a shared machine it changes within seconds)."""

    def __init__(self, order):
        self.order, self.i, self.done = list(order), 0, set()
        self.cond = threading.Condition()

    def begin(self, name: str) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.order[self.i] == name, timeout=600):
                raise RuntimeError(f"{name}: no turn for 10 minutes")

    def end(self, name: str) -> None:
        with self.cond:
            self._advance()

    def finish(self, name: str) -> None:
        with self.cond:
            self.done.add(name)
            if self.order[self.i] == name:
                self._advance()
            self.cond.notify_all()

    def _advance(self) -> None:
        for _ in self.order:
            self.i = (self.i + 1) % len(self.order)
            if self.order[self.i] not in self.done:
                break
        self.cond.notify_all()


def build_trainer(contender: str, a, config, initial, data, out_dir, turns: Turns):
    """A Trainer whose steps are timed (ms, from on_step_begin to on_step_end) in its turn."""
    from transformers import (PrinterCallback, RobertaForSequenceClassification, Trainer,
                              TrainerCallback, TrainingArguments)

    from flatfused.integrations.transformers import FlatTrainer, FlatTrainingArguments

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            turns.begin(contender)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(1e3 * (time.perf_counter() - self.t0))
            turns.end(contender)

    settings = dict(output_dir=str(out_dir), per_device_train_batch_size=a.batch,
                    gradient_accumulation_steps=a.accum, max_steps=a.steps, learning_rate=1e-4,
                    weight_decay=0.01, max_grad_norm=1.0, logging_steps=10**9,
                    save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, seed=0,
                    bf16=a.precision == "bf16")
    model = RobertaForSequenceClassification(config)
    model.load_state_dict(initial)
    timer = StepTimer()
    if contender == "adamw":
        trainer = Trainer(model=model, args=TrainingArguments(**settings), train_dataset=data,
                          callbacks=[timer])
    else:
        args = FlatTrainingArguments(flat_optimizer=contender, **FLAT[contender], **settings)
        trainer = FlatTrainer(model=model, args=args, train_dataset=data, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    return trainer, timer


def run_round(order, a, config, initial, data, tmp) -> dict:
    """Every contender's step times of one round (warm-up dropped), the steps taken in turn."""
    turns = Turns(order)
    built = {c: build_trainer(c, a, config, initial, data, Path(tmp) / c, turns) for c in order}
    errors = []

    def train(name):
        try:
            built[name][0].train()
        except BaseException as e:  # reported after the round
            errors.append(e)
        finally:
            turns.finish(name)

    threads = [threading.Thread(target=train, args=(c,)) for c in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {c: built[c][1].times[a.warmup:] for c in order}


def measure(a, contenders: list[str]) -> dict:
    import tempfile

    from transformers import RobertaConfig, RobertaForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = RobertaConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                           num_attention_heads=a.heads, intermediate_size=4 * a.hidden,
                           max_position_embeddings=a.seq + 4, num_labels=3)
    torch.manual_seed(0)
    initial = RobertaForSequenceClassification(config).state_dict()
    params = sum(v.numel() for k, v in initial.items() if "position_ids" not in k)
    data = Data(a.steps * a.accum * a.batch, a.seq, a.vocab)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            order = contenders if r % 2 == 0 else contenders[::-1]
            times = run_round(order, a, config, initial, data, tmp)
            ratios = {c: [x / y for x, y in zip(times[c], times["adamw"])]
                      for c in contenders if c != "adamw"}
            rounds.append({"order": order, "times_ms": times, "paired_ratios": ratios})
            print(f"round {r + 1}/{a.rounds}: " + ", ".join(
                f"{c} {statistics.median(times[c]):.1f} ms" for c in contenders), file=sys.stderr)
    summary = {}
    for c in contenders:
        pooled = [t for x in rounds for t in x["times_ms"][c]]
        entry = {"median_ms": statistics.median(pooled), "min_ms": min(pooled),
                 "steps_timed": len(pooled)}
        if c != "adamw":
            ratios = [q for x in rounds for q in x["paired_ratios"][c]]
            entry.update(paired_median_ratio=statistics.median(ratios),
                         round_paired_medians=[statistics.median(x["paired_ratios"][c])
                                               for x in rounds])
        summary[c] = entry
    return {"params": params, "rounds": rounds, "summary": summary}


def table(summary: dict) -> str:
    lines = ["| contender | ms/step (median) | x AdamW (paired median) |",
             "| --- | ---: | ---: |"]
    for c, e in summary.items():
        ratio = e.get("paired_median_ratio")
        lines.append(f"| {c} | {e['median_ms']:.1f} | "
                     f"{'1.00' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from flatfused.benchmark.report import machine_info, slug

    p = build_parser()
    a = p.parse_args(argv)
    contenders = check(p, a)
    machine = machine_info(torch.device("cpu"))
    output = a.output or str(RESULTS / f"trainer_roberta_tiny_cpu_{slug(machine['cpu'])}.json")
    try:  # the default is checked too, before anything is measured
        output_path()(output)
    except argparse.ArgumentTypeError as e:
        p.error(f"--output: {e}")
    if a.threads:
        torch.set_num_threads(a.threads)
    load_before = _load()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = measure(a, contenders)
    machine.update(threads=torch.get_num_threads(), load_average_before=load_before,
                   load_average_after=_load())
    record = {"benchmark": "flatfused-trainer-step", "schema": 1,
              "command": "python bench/bench_trainer.py " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "started": started, "machine": machine,
              "settings": {k: getattr(a, k) for k in ("rounds", "steps", "warmup", "batch",
                                                      "accum", "seq", "hidden", "layers",
                                                      "heads", "vocab", "precision")}
              | {"contenders": contenders, "flat": {c: FLAT[c] for c in contenders
                                                     if c in FLAT},
                 "params": result["params"], "step": "on_step_begin to on_step_end"},
              "summary": result["summary"], "rounds": result["rounds"]}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(record, f, indent=1)
    print(table(result["summary"]))
    print(f"written: {output}", file=sys.stderr)
    return 0


def _load():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())

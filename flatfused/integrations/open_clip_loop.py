"""The training epoch of the open_clip launcher (:mod:`flatfused.integrations.open_clip`):
open_clip's ``train_one_epoch`` with every step ``optimizer.step(closure)``, the closure being
open_clip's forward, loss and backward (with its feature-cache accumulation) for the batch."""
from __future__ import annotations

import contextlib
import logging
import math
import time

import torch

import flatfused

PROG = "python -m flatfused.integrations.open_clip"


def _kind(optimizer) -> str:
    if isinstance(optimizer, flatfused.NSO):
        return "nso"
    if isinstance(optimizer, flatfused.WeightedSAM):
        return "wsam"
    if isinstance(optimizer, flatfused.SAM):
        return "sam"
    raise TypeError(f"train_one_epoch of {PROG} needs a flatfused optimizer, got "
                    f"{type(optimizer).__name__}")


def _no_sync(model):
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def _record(passes, losses: dict, total: torch.Tensor, logit_scale) -> None:
    entry = {name: value.detach() for name, value in losses.items()}
    entry["loss"] = total.detach()
    passes.append((entry, logit_scale.detach()))


def make_closure(model, micro_batches, loss, autocast, scaler, passes, sync_model=None):
    """Open_clip's forward, loss and backward for one step's batch, as a closure.

    One micro-batch: the forward and the loss under ``autocast``, then ``backward`` (of the
    scaled loss when ``scaler`` is given). Several (``--accum-freq``): open_clip's accumulation,
    at the weights of the call: the features of every micro-batch without gradients, then per
    micro-batch a forward with gradients whose loss takes the other micro-batches' cached
    features as negatives, and its backward; all but the last backward run without DDP's
    synchronisation (``sync_model``), so the call synchronises once. Each call appends its
    (detached) losses and logit scale to ``passes`` and returns the total loss.
    """
    def backward(total):
        (scaler.scale(total) if scaler is not None else total).backward()

    if len(micro_batches) == 1:
        images, texts = micro_batches[0]

        def closure():
            with autocast():
                out = model(images, texts)
                losses = loss(**out, output_dict=True)
                total = sum(losses.values())
            backward(total)
            _record(passes, losses, total, out["logit_scale"])
            return total
        return closure

    unshared = ("logit_scale", "logit_bias")

    def closure():
        cached = {}
        with torch.no_grad(), autocast():
            for images, texts in micro_batches:
                out = model(images, texts)
                for key, value in out.items():
                    if key not in unshared:
                        cached.setdefault(key, []).append(value)
        last = len(micro_batches) - 1
        for j, (images, texts) in enumerate(micro_batches):
            with (contextlib.nullcontext() if j == last else _no_sync(sync_model)):
                with autocast():
                    out = model(images, texts)
                    kept = {k: out.pop(k) for k in unshared if k in out}
                    inputs = {k: torch.cat(v[:j] + [out[k]] + v[j + 1:]) for k, v in cached.items()}
                    losses = loss(**inputs, **kept, output_dict=True)
                    total = sum(losses.values())
                backward(total)
        _record(passes, losses, total, kept["logit_scale"])
        return total
    return closure


def flat_step(optimizer, closure, scaler, passes):
    """One step of a flatfused optimizer; the losses to log: the pass at the current weights
    (SAM's and WSAM's first, NSO's clean pass with ``lam > 0``), else the mean of NSO's passes."""
    kind = _kind(optimizer)
    if kind != "nso":  # NSO's step discards earlier gradients; SAM's and WSAM's use them
        optimizer.zero_grad()
    if kind == "sam":  # SAM's step ascends from the gradient of a first pass run before it
        closure()
    if scaler is not None:
        scaler.step(optimizer, closure)
        scaler.update()
    else:
        optimizer.step(closure)
    if kind == "nso" and optimizer.lam == 0.0:
        n = len(passes)
        losses = {k: sum(p[0][k] for p in passes) / n for k in passes[0][0]}
        return losses, sum(p[1] for p in passes) / n
    return passes[0]


def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                    tb_writer=None):
    """``open_clip_train.train.train_one_epoch`` with every step ``optimizer.step(closure)``.

    The same epoch as open_clip's (same signature, data, per-step scheduler call, ``logit_scale``
    clamp, log line and TensorBoard/W&B keys); only the step differs (see the module doc).
    """
    from open_clip import get_input_dtype
    from open_clip_train import train as oc_train
    from open_clip_train.distributed import is_master
    from open_clip_train.precision import get_autocast

    device = torch.device(args.device)
    autocast = get_autocast(args.precision, device_type=device.type)
    input_dtype = get_input_dtype(args.precision)
    # The optimizer synchronises through the module open_clip trains (DDP), not a compiled
    # wrapper of it.
    sync_model = getattr(model, "_orig_mod", model)
    optimizer.model = sync_model
    if scaler is not None:
        scaler.scale(torch.zeros((), device=device))  # GradScaler creates its scale lazily

    model.train()
    data["train"].set_epoch(epoch)
    dataloader = data["train"].dataloader
    accum = args.accum_freq
    steps_per_epoch = dataloader.num_batches // accum
    sample_digits = math.ceil(math.log(dataloader.num_samples + 1, 10))

    meters = {}
    batch_time, data_time = oc_train.AverageMeter(), oc_train.AverageMeter()
    end = time.time()
    micro_batches = []
    for i, (images, texts) in enumerate(dataloader):
        i_accum = i // accum
        step = steps_per_epoch * epoch + i_accum
        if not args.skip_scheduler:
            scheduler(step)
        images = images.to(device=device, dtype=input_dtype, non_blocking=True)
        texts = texts.to(device=device, non_blocking=True)
        micro_batches.append((images, texts))
        data_time.update(time.time() - end)
        if len(micro_batches) < accum:
            continue

        passes = []
        closure = make_closure(model, micro_batches, loss, autocast, scaler, passes, sync_model)
        losses, logit_scale = flat_step(optimizer, closure, scaler, passes)
        micro_batches = []
        with torch.no_grad():  # open_clip clamps the temperature at ln(100) after each step
            oc_train.unwrap_model(model).logit_scale.clamp_(0, math.log(100))

        batch_time.update(time.time() - end)
        end = time.time()
        batch_count = i_accum + 1
        if not is_master(args) or (i_accum % args.log_every_n_steps != 0
                                   and batch_count != steps_per_epoch):
            continue
        batch_size = len(images)
        for name, value in losses.items():
            meters.setdefault(name, oc_train.AverageMeter()).update(value.item(), batch_size)
        scale_value = logit_scale.item()
        per_second = accum * args.batch_size * args.world_size / batch_time.val
        per_second_per_gpu = accum * args.batch_size / batch_time.val
        lr = optimizer.param_groups[0]["lr"]
        num_samples = batch_count * batch_size * accum * args.world_size
        loss_log = " ".join(f"{name.capitalize()}: {m.val:#.5g} ({m.avg:#.5g})"
                            for name, m in meters.items())
        logging.info(
            f"Train Epoch: {epoch} [{num_samples:>{sample_digits}}/{dataloader.num_samples} "
            f"({100.0 * batch_count / steps_per_epoch:.0f}%)] "
            f"Data (t): {data_time.avg:.3f} "
            f"Batch (t): {batch_time.avg:.3f}, {per_second:#g}/s, {per_second_per_gpu:#g}/s/gpu "
            f"LR: {lr:5f} Logit Scale: {scale_value:.3f} " + loss_log)
        log_data = {"data_time": data_time.val, "batch_time": batch_time.val,
                    "samples_per_second": per_second,
                    "samples_per_second_per_gpu": per_second_per_gpu,
                    "scale": scale_value, "lr": lr}
        log_data.update({name: m.val for name, m in meters.items()})
        log_data = {"train/" + name: value for name, value in log_data.items()}
        if tb_writer is not None:
            for name, value in log_data.items():
                tb_writer.add_scalar(name, value, step)
        if args.wandb:
            assert oc_train.wandb is not None, "Please install wandb."
            log_data["step"] = step
            oc_train.wandb.log(log_data, step=step)
        batch_time.reset()
        data_time.reset()

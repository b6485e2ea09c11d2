"""The two experiments as :class:`~flatfused.sam_edge.experiment.Task` objects: data loaded and
put on the device, the model built from the original's flags, the loss and the test measurement."""
from __future__ import annotations

import itertools

import torch

from . import data, models
from .experiment import Task


def _generator(seed: int, stream: int) -> torch.Generator:
    """One CPU generator per use (initialisation, batch order) so that they do not interleave."""
    return torch.Generator().manual_seed(seed * 1000 + stream)


def image_classification(args, device: torch.device) -> Task:
    """The original's ``image_classification``: pixels scaled by 1/256 and centred by the mean image
    of the first training batch, squared loss against one-hot labels, batches in a fixed order
    cycled (the original's input pipeline does not shuffle); the test error at the end."""
    batch = args.batch_size
    train_size = None if args.mini_training_set_num_batches is None or batch is None else \
        args.mini_training_set_num_batches * batch
    test_size = None if args.mini_test_set_num_batches is None or batch is None else \
        args.mini_test_set_num_batches * batch
    images = data.load_images(args.dataset, args.data_dir, train_size, test_size)
    n_train = len(images.train_y)
    if batch is None:
        batch = n_train  # the original's default, 60000, is MNIST's whole training set
    if batch > n_train:
        raise data.DataError(f"--batch_size {batch} exceeds the {n_train} training examples "
                             f"of {images.name}")
    channels, side = images.train_x.shape[1], images.train_x.shape[2]
    if args.nn_architecture == "CNN" and side >> args.cnn_num_blocks == 0:
        raise data.DataError(f"--cnn_num_blocks {args.cnn_num_blocks} pools the {side}x{side} "
                             f"images of {images.name} to nothing (at most "
                             f"{side.bit_length() - 1} blocks)")
    train_x = images.train_x.to(device=device, dtype=torch.float32) / 256.0
    test_x = images.test_x.to(device=device, dtype=torch.float32) / 256.0
    mean = train_x[:batch].mean(0, keepdim=True)
    train_x, test_x = train_x - mean, test_x - mean
    train_y, test_y = images.train_y.to(device), images.test_y.to(device)

    gen = _generator(args.seed, 0)
    if args.nn_architecture == "CNN":
        model = models.CNN(channels, side, args.cnn_num_blocks, args.cnn_layers_per_block,
                           args.cnn_feature_multiplier, data.NUM_CLASSES, gen)
    else:
        model = models.MLP(channels * side * side, args.mlp_depth, args.mlp_width,
                           data.NUM_CLASSES, gen)
    model.to(device)
    batches = data.fixed_batches(train_x, train_y, batch)

    def evaluate():  # the error over every test example, in batches of at most batch_size
        wrong = sum(int((model(test_x[i:i + batch]).argmax(1) != test_y[i:i + batch]).sum())
                    for i in range(0, len(test_y), batch))
        return "test_error", wrong / len(test_y)

    return Task("image classification", model, models.squared_loss,
                itertools.cycle(batches), evaluate, images.describe(), batch)


def transformer(args, device: torch.device) -> Task:
    """The original's ``transformer``: next-character prediction on ASCII text with the original's
    model; pieces of ``sequence_length + 1`` characters in a new random order each pass; the
    test loss (mean per character over the test pieces) at the end."""
    if args.training_data is None:
        train_text, test_text, described = data.default_text()
    else:
        train_text = data.read_text(args.training_data, "--training_data")
        test_text = data.read_text(args.test_data, "--test_data")
        described = f"training text {args.training_data}, test text {args.test_data}"
    pieces = data.chunks(train_text, args.sequence_length)
    test_pieces = data.chunks(test_text, args.sequence_length)
    if len(pieces) < args.batch_size:
        raise data.DataError(
            f"the training text has {len(pieces)} pieces of --sequence_length + 1 = "
            f"{args.sequence_length + 1} characters, fewer than --batch_size {args.batch_size}: "
            "give a longer text, a shorter sequence length or a smaller batch")
    if len(test_pieces) == 0:
        raise data.DataError(f"the test text is shorter than --sequence_length + 1 = "
                             f"{args.sequence_length + 1} characters")
    described += (f": {len(train_text)} training and {len(test_text)} test characters, "
                  f"{len(pieces)} training pieces of {args.sequence_length + 1}")
    model = models.TransformerLM(data.VOCAB_SIZE, args.sequence_length, args.num_layers,
                                 args.num_heads, args.key_size, args.model_size,
                                 _generator(args.seed, 0)).to(device)
    pieces, test_pieces = pieces.to(device), test_pieces.to(device)
    order = _generator(args.seed, 1)
    batches = ((x.to(device), y.to(device))
               for x, y in data.text_batches(pieces, args.batch_size, order))

    def evaluate():
        total = 0.0
        for i in range(0, len(test_pieces), args.batch_size):
            piece = test_pieces[i:i + args.batch_size]
            total += float(models.next_token_loss(model(piece[:, :-1]), piece[:, 1:])) * len(piece)
        return "test_loss", total / len(test_pieces)

    return Task("transformer", model, models.next_token_loss, batches, evaluate, described,
                args.batch_size)

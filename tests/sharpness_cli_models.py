"""A tiny model factory and data for the ``flatfused sharpness`` tests (imported by the command
through ``--model sharpness_cli_models:make_model`` or this file's path)."""
import torch


def make_model(width: int = 8) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(5, width), torch.nn.BatchNorm1d(width),
                               torch.nn.Tanh(), torch.nn.Linear(width, 3))


def dataset(n: int = 48) -> torch.utils.data.Dataset:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 5, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def batches():
    """The same data as a list of (inputs, targets) batches of 16."""
    x, y = dataset().tensors
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)]


MODEL = make_model(4)
NOT_A_MODEL = 3

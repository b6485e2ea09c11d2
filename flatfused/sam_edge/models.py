"""The original's networks in PyTorch: its MLP and CNN (Flax) for images and its character-level
transformer language model (Haiku), with the same shapes and initialisations.

Initialisations, as the original's libraries define them: Flax's ``glorot_normal`` (a normal
truncated at two standard deviations and rescaled to the variance ``2 / (fan_in + fan_out)``)
for every image-model kernel, zero biases; Haiku's ``VarianceScaling(2 / num_layers)`` (fan-in,
truncated, rescaled) for the transformer's attention and MLP weights, ``TruncatedNormal(0.02)``
(truncated, not rescaled) for the embeddings and ``TruncatedNormal(1 / sqrt(fan_in))`` for the
output layer. Every draw comes from the generator passed in, not from torch's global RNG.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The standard deviation of a standard normal truncated to [-2, 2]; rescaling initialisers
# divide by it so that the truncated draws have the variance they ask for.
_TRUNCATED_STD = 0.87962566103423978


def _truncated_normal_(tensor: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        return nn.init.trunc_normal_(tensor, 0.0, std, -2 * std, 2 * std, generator=gen)


def _fans(weight: torch.Tensor):
    """(fan_in, fan_out) of a Linear (out, in) or Conv2d (out, in, kh, kw) weight."""
    receptive = math.prod(weight.shape[2:])
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def _glorot_normal_(layer: nn.Module, gen: torch.Generator) -> nn.Module:
    fan_in, fan_out = _fans(layer.weight)
    _truncated_normal_(layer.weight, math.sqrt(2.0 / (fan_in + fan_out)) / _TRUNCATED_STD, gen)
    nn.init.zeros_(layer.bias)
    return layer


class MLP(nn.Sequential):
    """``depth`` dense layers (``depth - 1`` hidden of ``width``, ReLU), on flattened images."""

    def __init__(self, in_features: int, depth: int, width: int, classes: int,
                 gen: torch.Generator):
        sizes = [in_features] + [width] * (depth - 1) + [classes]
        layers = [nn.Flatten()]
        for i in range(depth):
            layers.append(_glorot_normal_(nn.Linear(sizes[i], sizes[i + 1]), gen))
            if i < depth - 1:
                layers.append(nn.ReLU())
        super().__init__(*layers)
        self.architecture = "MLP " + "-".join(map(str, sizes))


class ChannelLayerNorm(nn.LayerNorm):
    """Flax's ``nn.LayerNorm()`` on NHWC activations, i.e. over the channels of each pixel,
    applied to NCHW ones (Flax's epsilon, 1e-6)."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-6)

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CNN(nn.Sequential):
    """``num_blocks`` blocks of ``layers_per_block`` 3x3 convolutions ('SAME' padding) with
    ``2**block * feature_multiplier`` channels, each followed by ReLU and a layer norm over the
    channels; a 2x2 max-pool after each block; a dense layer to the classes."""

    def __init__(self, channels: int, image_size: int, num_blocks: int, layers_per_block: int,
                 feature_multiplier: int, classes: int, gen: torch.Generator):
        layers, c, side, widths = [], channels, image_size, []
        for block in range(num_blocks):
            features = 2 ** block * feature_multiplier
            for _ in range(layers_per_block):
                layers += [_glorot_normal_(nn.Conv2d(c, features, 3, padding=1), gen), nn.ReLU(),
                           ChannelLayerNorm(features)]
                c = features
            layers.append(nn.MaxPool2d(2))
            side //= 2
            widths.append(str(features))
        layers += [nn.Flatten(), _glorot_normal_(nn.Linear(c * side * side, classes), gen)]
        super().__init__(*layers)
        self.architecture = (f"CNN {num_blocks} blocks x {layers_per_block} conv "
                             f"({'/'.join(widths)} channels) + dense to {classes}")


class _Attention(nn.Module):
    """Haiku's ``MultiHeadAttention``: ``num_heads`` heads of ``key_size`` (not tied to the
    model size), causal, then a projection back to the model size."""

    def __init__(self, model_size: int, num_heads: int, key_size: int, init, gen):
        super().__init__()
        self.num_heads, self.key_size = num_heads, key_size
        inner = num_heads * key_size
        self.query, self.key, self.value = (init(nn.Linear(model_size, inner), gen)
                                            for _ in range(3))
        self.out = init(nn.Linear(inner, model_size), gen)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (layer(x).view(b, t, self.num_heads, self.key_size).transpose(1, 2)
                   for layer in (self.query, self.key, self.value))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(h.transpose(1, 2).reshape(b, t, -1))


class _Block(nn.Module):
    """A pre-norm transformer layer: attention, then a GELU MLP four times as wide."""

    def __init__(self, model_size, num_heads, key_size, init, gen):
        super().__init__()
        self.norm1 = nn.LayerNorm(model_size)
        self.attention = _Attention(model_size, num_heads, key_size, init, gen)
        self.norm2 = nn.LayerNorm(model_size)
        self.dense1 = init(nn.Linear(model_size, 4 * model_size), gen)
        self.dense2 = init(nn.Linear(4 * model_size, model_size), gen)

    def forward(self, h):
        h = h + self.attention(self.norm1(h))
        # jax.nn.gelu is the tanh approximation by default
        return h + self.dense2(F.gelu(self.dense1(self.norm2(h)), approximate="tanh"))


class TransformerLM(nn.Module):
    """The original's character-level language model: token and learned position embeddings,
    ``num_layers`` pre-norm layers, a final layer norm and an untied output layer to the
    ``vocab_size`` code points. ``forward(tokens (B, T)) -> logits (B, T, vocab_size)``."""

    def __init__(self, vocab_size: int, sequence_length: int, num_layers: int, num_heads: int,
                 key_size: int, model_size: int, gen: torch.Generator):
        super().__init__()
        scale = 2.0 / num_layers

        def variance_scaling(layer, gen):
            fan_in, _ = _fans(layer.weight)
            _truncated_normal_(layer.weight, math.sqrt(scale / fan_in) / _TRUNCATED_STD, gen)
            nn.init.zeros_(layer.bias)
            return layer

        self.embed = nn.Embedding(vocab_size, model_size)
        self.position = nn.Parameter(torch.empty(sequence_length, model_size))
        _truncated_normal_(self.embed.weight, 0.02, gen)
        _truncated_normal_(self.position, 0.02, gen)
        self.layers = nn.ModuleList(_Block(model_size, num_heads, key_size, variance_scaling, gen)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(model_size)
        self.output = nn.Linear(model_size, vocab_size)
        _truncated_normal_(self.output.weight, 1.0 / math.sqrt(model_size), gen)
        nn.init.zeros_(self.output.bias)
        self.architecture = (f"transformer LM {num_layers} layers, {num_heads} heads x key size "
                             f"{key_size}, model size {model_size}, context {sequence_length}, "
                             f"vocabulary {vocab_size}")

    def forward(self, tokens):
        h = self.embed(tokens) + self.position[:tokens.shape[1]]
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


def squared_loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The original's image loss: the mean over examples and classes of ``(output - onehot)^2``
    (optax's ``squared_error``, without a factor 1/2)."""
    onehot = F.one_hot(labels, outputs.shape[-1]).to(outputs.dtype)
    return (outputs - onehot).square().mean()


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The original's language-model loss: the mean negative log-likelihood per token. (It
    masks padding positions; a corpus here has no NUL, its padding token, so none are masked.)"""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

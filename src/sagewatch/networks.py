"""The autoencoders, as torch modules that ``detector.json`` can rebuild.

* :class:`DenseAutoencoder` reconstructs each feature row on its own;
  :func:`dense_forward` computes its output with numpy for scoring.
* :class:`ConvAutoencoder` reconstructs sequences with strided 1-D
  convolutions.
* :class:`CausalConvAutoencoder` reconstructs each row from it and earlier rows
  with causal 1-D convolutions, in one pass over a long series.

Each stores its constructor's arguments (``arguments()``), which is all a saved
detector needs besides the weights to build it again.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


class DenseAutoencoder(nn.Module):
    """Reconstructs each feature row from itself through a narrower code.

    Fully connected layers of ``hidden_dims`` units, then ``encoding_dim`` code
    units, mirrored back to the features. The rolling features already describe
    the recent past of each sensor, so one row carries the history the model needs;
    a row costs a few thousand multiply-adds, whatever the length of its past.
    """

    def __init__(
        self, n_features: int, hidden_dims: Sequence[int], encoding_dim: int
    ) -> None:
        super().__init__()
        self.n_features = n_features
        self.hidden_dims = list(hidden_dims)
        self.encoding_dim = encoding_dim
        widths = [n_features, *hidden_dims, encoding_dim]
        encoder: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            encoder += [nn.Linear(a, b), nn.ReLU()]
        decoder: list[nn.Module] = []
        back = widths[::-1]
        for a, b in itertools.pairwise(back[:-1]):
            decoder += [nn.Linear(a, b), nn.ReLU()]
        decoder.append(nn.Linear(back[-2], n_features))
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., features)
        return self.decoder(self.encoder(x))  # (..., features)

    def layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Weights (in, out) and biases of each linear layer, for :func:`dense_forward`.

        Kept after the first call: the model is trained by then.
        """
        if not hasattr(self, "_layers"):
            linear = [m for m in self.modules() if isinstance(m, nn.Linear)]
            self._layers = [
                (m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy())
                for m in linear
            ]
        return self._layers

    def arguments(self) -> dict[str, Any]:
        """The constructor's arguments, as stored in ``detector.json``."""
        return {
            "type": "dense",
            "n_features": self.n_features,
            "hidden_dims": self.hidden_dims,
            "encoding_dim": self.encoding_dim,
        }


def dense_forward(
    layers: Sequence[tuple[np.ndarray, np.ndarray]], x: np.ndarray
) -> np.ndarray:
    """A :class:`DenseAutoencoder`'s output computed with numpy. (..., rows,
    features); a stack of tiles is multiplied tile by tile.

    Scoring uses this instead of torch: numpy runs one matrix product per tile of
    a stack, so a row kept in the same place of a same-shaped tile (see
    :mod:`sagewatch.row_scores`) scores the same in any block.
    """
    for i, (weight, bias) in enumerate(layers):
        x = x @ weight
        x += bias
        if i < len(layers) - 1:
            np.maximum(x, 0.0, out=x)
    return x


class ConvAutoencoder(nn.Module):
    """Reconstructs sequences of feature rows with strided 1-D convolutions.

    The encoder halves the sequence length at each of its layers (channels
    ``hidden_dims`` then ``encoding_dim``); the decoder mirrors it with transposed
    convolutions and restores the exact length for any ``sequence_length``.
    """

    def __init__(
        self,
        n_features: int,
        sequence_length: int,
        hidden_dims: Sequence[int],
        encoding_dim: int,
        kernel_size: int,
    ) -> None:
        super().__init__()
        self.n_features = n_features
        self.sequence_length = sequence_length
        self.hidden_dims = list(hidden_dims)
        self.encoding_dim = encoding_dim
        self.kernel_size = kernel_size
        channels = [n_features, *hidden_dims, encoding_dim]
        pad = kernel_size // 2
        lengths = [sequence_length]
        encoder: list[nn.Module] = []
        for a, b in itertools.pairwise(channels):
            encoder += [nn.Conv1d(a, b, kernel_size, stride=2, padding=pad), nn.ReLU()]
            lengths.append((lengths[-1] + 2 * pad - kernel_size) // 2 + 1)
        decoder: list[nn.Module] = []
        back = [*channels[:0:-1], channels[1]]  # code -> ... -> first hidden
        for i, (a, b) in enumerate(itertools.pairwise(back)):
            target = lengths[-2 - i]
            natural = (lengths[-1 - i] - 1) * 2 - 2 * pad + kernel_size
            decoder += [
                nn.ConvTranspose1d(
                    a, b, kernel_size, 2, pad, output_padding=target - natural
                ),
                nn.ReLU(),
            ]
        decoder.append(nn.Conv1d(channels[1], n_features, 1))
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, length, features)
        code = self.encoder(x.transpose(1, 2))  # (batch, encoding_dim, length / 2^k)
        return self.decoder(code).transpose(1, 2)  # (batch, length, features)

    def arguments(self) -> dict[str, Any]:
        """The constructor's arguments, as stored in ``detector.json``."""
        return {
            "type": "window",
            "n_features": self.n_features,
            "sequence_length": self.sequence_length,
            "hidden_dims": self.hidden_dims,
            "encoding_dim": self.encoding_dim,
            "kernel_size": self.kernel_size,
        }


class CausalConvAutoencoder(nn.Module):
    """Reconstructs each feature row from itself and earlier rows, never later ones.

    Encoder and decoder are stacks of causal 1-D convolutions (channels
    ``hidden_dims``, dilation 1, 2, 4, ... layer by layer) joined by a 1x1 code
    layer of ``encoding_dim`` channels. The output at a row depends only on that row
    and the :attr:`receptive_field` rows before it, so a long series is scored in
    one pass instead of one window per row.

    Notes:
        What a row adds to its history has to pass through the ``encoding_dim``
        code channels of that row; earlier codes carry only earlier rows. With
        fewer code channels than sensors the model must learn how the sensors
        move together, and a row that breaks that pattern is reconstructed badly.
    """

    def __init__(
        self,
        n_features: int,
        hidden_dims: Sequence[int],
        encoding_dim: int,
        kernel_size: int,
    ) -> None:
        super().__init__()
        self.n_features = n_features
        self.hidden_dims = list(hidden_dims)
        self.encoding_dim = encoding_dim
        self.kernel_size = kernel_size
        self.encoder = _causal_stack(n_features, hidden_dims, encoding_dim, kernel_size)
        self.decoder = _causal_stack(encoding_dim, hidden_dims, n_features, kernel_size)

    @property
    def receptive_field(self) -> int:
        """Earlier rows that the reconstruction of a row depends on."""
        one_stack = sum(
            (self.kernel_size - 1) * 2**i for i in range(len(self.hidden_dims))
        )
        return 2 * one_stack

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, length, features)
        code = self.encoder(x.transpose(1, 2))  # (batch, encoding_dim, length)
        return self.decoder(code).transpose(1, 2)  # (batch, length, features)

    def arguments(self) -> dict[str, Any]:
        """The constructor's arguments, as stored in ``detector.json``."""
        return {
            "type": "causal",
            "n_features": self.n_features,
            "hidden_dims": self.hidden_dims,
            "encoding_dim": self.encoding_dim,
            "kernel_size": self.kernel_size,
        }


def _causal_stack(
    channels_in: int, hidden: Sequence[int], channels_out: int, kernel_size: int
) -> nn.Sequential:
    """Causal dilated convolutions (left padding only), then a 1x1 projection."""
    layers: list[nn.Module] = []
    width = channels_in
    for i, channels in enumerate(hidden):
        dilation = 2**i
        layers += [
            nn.ConstantPad1d(((kernel_size - 1) * dilation, 0), 0.0),
            nn.Conv1d(width, channels, kernel_size, dilation=dilation),
            nn.ReLU(),
        ]
        width = channels
    layers.append(nn.Conv1d(width, channels_out, 1))
    return nn.Sequential(*layers)

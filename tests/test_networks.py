"""The autoencoders' shapes and stored arguments."""

from __future__ import annotations

import pytest
import torch

from sagewatch.networks import ConvAutoencoder, DenseAutoencoder


@pytest.mark.parametrize("length", [2, 7, 16, 33])
def test_autoencoder_restores_any_sequence_length(length: int) -> None:
    model = ConvAutoencoder(5, length, [8, 4], 3, 5)

    out = model(torch.zeros(2, length, 5))

    assert out.shape == (2, length, 5)


def test_dense_autoencoder_keeps_the_shape_of_any_batch() -> None:
    net = DenseAutoencoder(6, [4], 2)

    assert net(torch.zeros(5, 6)).shape == (5, 6)
    assert net(torch.zeros(5, 1, 6)).shape == (5, 1, 6)
    assert net.arguments() == {
        "type": "dense",
        "n_features": 6,
        "hidden_dims": [4],
        "encoding_dim": 2,
    }

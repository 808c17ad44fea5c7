"""Mask input and the mask pyramid."""

import numpy as np
import pytest
import torch
from PIL import Image

from fisedit_ray.masks import MaskPyramid, blob_mask, to_latent_mask


def test_image_resolution_masks_are_any_pooled():
    arr = np.zeros((16, 16), bool)
    arr[5, 9] = True
    latent = to_latent_mask(arr, (8, 8), 2)
    assert latent.shape == (8, 8) and latent.sum() == 1 and latent[2, 4]
    png = Image.fromarray((arr * 255).astype(np.uint8))
    assert torch.equal(to_latent_mask(png, (8, 8), 2), latent)
    assert torch.equal(to_latent_mask(arr.astype(np.uint8), (8, 8), 2), latent)


@pytest.mark.parametrize(
    "mask, message",
    [
        (
            np.zeros((7, 8), bool),
            r"mask has shape \(7, 8\); expected the latent size \(8, 8\) or the image size",
        ),
        (np.full((8, 8), 0.3), "mask must be binary"),
    ],
)
def test_bad_masks(mask, message):
    with pytest.raises(ValueError, match=message):
        to_latent_mask(mask, (8, 8), 2)


def test_pyramid_is_max_pooled_with_ranks():
    mask = torch.zeros(5, 6, dtype=torch.bool)
    mask[4, 5] = True
    mask[0, 0] = True
    p = MaskPyramid.build(mask, [(5, 6), (3, 3), (2, 2)])
    assert p.masks[1].nonzero().tolist() == [[0, 0], [2, 2]]
    assert p.masks[2].nonzero().tolist() == [[0, 0], [1, 1]]
    for level in range(3):
        assert torch.equal(p.rank[level][p.cells[level]], torch.arange(len(p.cells[level])))
        assert (p.rank[level] >= 0).sum() == len(p.cells[level])
    assert p.ratio == pytest.approx(2 / 30)


def test_blob_mask_ratio_and_determinism():
    a = blob_mask((32, 32), 0.05, seed=3)
    assert a.sum() == round(0.05 * 1024)
    assert torch.equal(a, blob_mask((32, 32), 0.05, seed=3))
    assert not torch.equal(a, blob_mask((32, 32), 0.05, seed=4))

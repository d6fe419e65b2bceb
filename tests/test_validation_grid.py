"""Training's MLflow validation grid: the held-out validation latents keep their ground truth at every
validation size, and the grid puts it beside the decode (labelled, with zoomed centres)."""

import numpy as np

from pipelines.common.grids import GAP, LARGEST_FONT
from pipelines.common.holdout import held_out_images
from pipelines.common.latent_record import read_latent_record
from pipelines.common.reconstruction import crop_pairs, read_images
from pipelines.training.mlflow_rank0 import validation_grid
from pipelines.training.validation import truth_name, write_validation_latents


def test_validation_latents_keep_the_truth_at_every_validation_size(embedded_latents, tmp_path):
    record = read_latent_record(str(embedded_latents["latents"]))
    path = write_validation_latents(str(embedded_latents["images"]), record, str(tmp_path / "validation.npz"))
    saved = np.load(path)
    count, side = len(saved["keys"]), record.input_side
    sizes = record.validation_sizes()
    assert len(sizes) >= 2 and {truth_name(size) for size in sizes} <= set(saved.files)
    for height, width in sizes:
        assert saved[truth_name((height, width))].shape == (count, height, width, 3)
    # at 1× the truth is the very crop that was encoded: the decoder's task, exactly
    refs = held_out_images(str(embedded_latents["images"]), str(embedded_latents["latents"]), count)
    encoder_inputs, _ = crop_pairs(read_images(refs), (side, side), side)
    assert np.array_equal(saved[truth_name((side, side))], encoder_inputs)


def test_the_validation_grid_shows_truth_beside_the_decode():
    rng = np.random.default_rng(0)
    truths = rng.integers(0, 255, (2, 32, 64, 3), dtype=np.uint8)
    decoded = [rng.integers(0, 255, (32, 64, 3), dtype=np.uint8) for _ in range(2)]
    grid = validation_grid(decoded, truths)
    top = LARGEST_FONT + 6 + GAP
    assert grid.shape == (top + 4 * 32 + 3 * GAP, 2 * 64 + GAP, 3)  # two images, each with its zoom row
    assert np.array_equal(grid[top : top + 32, :64], truths[0])
    assert np.array_equal(grid[top : top + 32, 64 + GAP :], decoded[0])
    alone = validation_grid(decoded, None)  # training latents: nothing to compare with, and labelled so
    assert alone.shape[1] == 64

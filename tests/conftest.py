import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    # Every test starts from the same RNG state, so a failure reproduces exactly.
    torch.manual_seed(0)

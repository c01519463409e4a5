import pytest
import torch

# Test tensors are tiny: one intra-op thread is faster than two and immune to a busy second core.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

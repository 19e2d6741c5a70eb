"Shared test settings: one intra-op thread per process and a seeded RNG per test (`slow` is deselected in pyproject.toml)"
import pytest, torch

# The suite runs on 2 shared cores (often as 2 xdist workers): intra-op threads only fight each other for them,
# and made the tiny convolutions of the grids ~10× slower.
torch.set_num_threads(1)

@pytest.fixture(autouse=True)
def _seed():
    "Every test starts from the same RNG state, whatever ran before it (xdist order varies)"
    torch.manual_seed(0)

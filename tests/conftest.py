"Shared test settings: one intra-op thread per process, a seeded RNG per test, `slow` tests skipped unless asked for"
import pytest, torch

# The suite runs on 2 shared cores (often as 2 xdist workers): intra-op threads only fight each other for them,
# and made the tiny convolutions of the grids ~10× slower.
torch.set_num_threads(1)

def pytest_addoption(parser): parser.addoption('--runslow', action='store_true', help='also run the tests marked slow')

def pytest_configure(config): config.addinivalue_line('markers', 'slow: heavy test, skipped unless --runslow or -m selects it')

def pytest_collection_modifyitems(config, items):
    "Skip `slow` tests by default (as if `-m 'not slow'`), unless --runslow or an explicit -m expression is given"
    if config.getoption('--runslow') or config.getoption('markexpr'): return
    skip = pytest.mark.skip(reason='slow: run with --runslow or -m slow')
    for item in items:
        if 'slow' in item.keywords: item.add_marker(skip)

@pytest.fixture(autouse=True)
def _seed():
    "Every test starts from the same RNG state, whatever ran before it (xdist order varies)"
    torch.manual_seed(0)

import os

import pytest

# Triton runs CPU tensors only through its interpreter; the switch must be set before triton is
# imported anywhere. On a GPU machine (REASONRL_GPU_TESTS=1) we leave it off.
if os.environ.get("REASONRL_GPU_TESTS", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (`pytestmark = pytest.mark.usefixtures("one_thread")`), as
    the `reasonrl` CLI defaults to: at tiny shapes a second OpenMP thread buys nothing, and on the
    busy 2-core CI machine its spin-waits made files 3-50x slower in wall time."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed_fresh():
    # Fresh random inputs each run (STYLE.md), but reproducible within a run from the printed seed.
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch.manual_seed({seed})")  # shown with a failure's captured output
    yield seed

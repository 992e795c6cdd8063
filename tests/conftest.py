import os

import pytest
import torch

# The suite runs on 2 cores beside other work: one thread per test process.
torch.set_num_threads(1)
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def toy2d():
    from schedules import load_model

    return load_model("builtin:toy2d-flow")

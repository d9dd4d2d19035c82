import logging
import warnings

import pytest
import torch

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=UserWarning)
logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

QUIET = {
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
}


@pytest.fixture
def quiet():
    return dict(QUIET)

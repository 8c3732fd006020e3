import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from families import FAMILIES  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(params=FAMILIES, ids=[f.id for f in FAMILIES])
def family(request):
    return request.param


from castle_convert.attention import KINDS  # noqa: E402


@pytest.fixture(params=list(KINDS))
def kind(request):
    """Every attention kind of castle_convert.attention.KINDS (the shared checks run on each)."""
    return request.param

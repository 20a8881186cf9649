import pytest

from scenes.config import ScenesConfig
from scenes.dataset import render_dataset


@pytest.fixture(scope="session")
def web_dir(tmp_path_factory):
    """A small rendered scene web: 40 rows, 15 faulty, so every fault kind appears at least once."""
    out = tmp_path_factory.mktemp("web")
    render_dataset(ScenesConfig(n=40, size=64, seed=3, faults=15 / 40), out)
    return out

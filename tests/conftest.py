"""Test-wide environment.  TRITON_INTERPRET must be set before any @triton.jit module is
imported, and DeepSpeed must pick its CPU accelerator: both are set here, before anything else."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import importlib.util  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def load_script(path: Path):
    """Import an entry script (launch/*.py) as a module by its path: scripts are not a package."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def builtin_dir(tmp_path_factory) -> Path:
    """The bundled digits dataset (data_prep/builtin.py), built once per test session:
    images, pair/qa/mmeb/eval manifests and shards; see its builtin.json."""
    from data_prep.builtin import build

    out = tmp_path_factory.mktemp("builtin")
    build(out, workers=2)
    return out

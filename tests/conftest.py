"""Shared fixtures.  `toy_root`: the tiny toy world, built once per test session (or reused from $TOY_TINY_ROOT)."""
import os

import pytest


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """Path (str) of a complete tiny toy world (data + pretrained tiny backbones).

    Set TOY_TINY_ROOT to a folder built with `python data/toy.py --tiny --out <dir>` to skip the build."""
    env = os.environ.get("TOY_TINY_ROOT")
    if env and os.path.isfile(os.path.join(env, "manifest.json")):
        return env
    from data.toy import build_toy_world
    root = tmp_path_factory.mktemp("toy") / "world"
    build_toy_world(str(root), tiny=True, seed=0)
    return str(root)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread while a module runs: the models are tiny, and on a shared 2-core machine OpenMP threads
    spin-waiting on each other make them many times slower.  Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)

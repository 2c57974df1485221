"""Shared fixtures.  `toy_root`: the tiny toy world, built once per test session (or reused from $TOY_TINY_ROOT).

TOY_SEED=N builds the tiny world from seed N (default 0, what CI runs).  A toy world is built by training, so its
last bits differ between machines; every test that asserts learning must pass on worlds of several seeds:
    for s in 0 1 2; do TOY_SEED=$s python -m pytest -q; done
"""
import os

import pytest


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """Path (str) of a complete tiny toy world (data + pretrained tiny backbones).

    Set TOY_TINY_ROOT to a folder built with `python data/toy.py --tiny --out <dir>` to skip the build (its
    missing backbones are added); TOY_SEED picks the seed of a world built here."""
    from data.toy import build_toy_world, ensure_toy_world
    env = os.environ.get("TOY_TINY_ROOT")
    if env and os.path.isfile(os.path.join(env, "manifest.json")):
        return ensure_toy_world(env, tiny=True)
    root = tmp_path_factory.mktemp("toy") / "world"
    build_toy_world(str(root), tiny=True, seed=int(os.environ.get("TOY_SEED", "0")))
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


@pytest.fixture
def slowed(monkeypatch):
    """slowed(module, delay) -> a list that receives the batch size of each call of `module.collate`, which now
    sleeps `delay` s first: a training loader made slow by a known amount, so a test can tell that --bench draws
    the real loader's batches and times them apart from the step."""
    import time

    def slow(module, delay):
        calls, real = [], module.collate

        def collate(items, *args, **kwargs):
            calls.append(len(items))
            time.sleep(delay)
            return real(items, *args, **kwargs)
        monkeypatch.setattr(module, "collate", collate)
        return calls
    return slow

"""Shared fixtures.  `toy_root`: the tiny toy world, built once per test session (or reused from $TOY_TINY_ROOT).

TOY_SEED=N builds the tiny world from seed N (default 0, what CI runs).  A toy world is built by training, so its
last bits differ between machines; every test that asserts learning must pass on worlds of several seeds:
    for s in 0 1 2; do TOY_SEED=$s python -m pytest -q; done

pytest.ini runs the suite in two processes (pytest-xdist, `-n 2 --dist loadfile`: a module's tests, and so its
module fixtures, stay in one process); they share one tiny world.  `-n 0` runs it in this process (for --pdb).
"""
import contextlib
import os
import shutil
import sys
import tempfile

import pytest

# The suite starts many Python processes (torchrun ranks, spawned workers, command-line runs), each importing torch
# and transformers: about 2,700 modules.  Where bytecode is not written (PYTHONDONTWRITEBYTECODE, as on the CI
# machines) and the packages came without .pyc files (pip --no-compile, the README's install), every process compiled
# them again, about 3 s of CPU each.  For the session, bytecode goes to one private folder that every process reads
# (PYTHONPYCACHEPREFIX), removed at the end: no __pycache__ appears in the user's trees.
_PYCACHE = None
if sys.dont_write_bytecode and not os.environ.get("PYTHONPYCACHEPREFIX"):
    _PYCACHE = tempfile.mkdtemp(prefix="pytest-pycache-")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = sys.pycache_prefix = _PYCACHE
    sys.dont_write_bytecode = False


WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1" in the processes that pytest-xdist starts


def pytest_configure(config):
    if WORKER:  # two test processes on two cores: one intra-op thread each, and in the processes they start
        import torch
        torch.set_num_threads(1)
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_unconfigure(config):
    if _PYCACHE:
        shutil.rmtree(_PYCACHE, ignore_errors=True)


@contextlib.contextmanager
def _exclusive(path):
    """One process at a time (the xdist workers) inside the block.  Where fcntl is missing (Windows) there is no
    lock: each worker may then build the toy world, and ensure_toy_world keeps the first one renamed into place."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """Path (str) of a complete tiny toy world (data + pretrained tiny backbones).

    Set TOY_TINY_ROOT to a folder built with `python data/toy.py --tiny --out <dir>` to skip the build (its
    missing backbones are added); TOY_SEED picks the seed of a world built here.  The first worker builds it, the
    other waits and reads the same folder."""
    from data.toy import ensure_toy_world
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if WORKER else shared  # the session's folder, above the workers' own
    with _exclusive(str(shared / "toy_world.lock")):
        env = os.environ.get("TOY_TINY_ROOT")
        root = env if env and os.path.isfile(os.path.join(env, "manifest.json")) else str(shared / "toy_world")
        return ensure_toy_world(root, tiny=True, seed=int(os.environ.get("TOY_SEED", "0")))  # (a built world: its seed)


@pytest.fixture(scope="session")
def spawn():
    """spawn(fn, args): fn(rank, *args) in two processes, as torch.multiprocessing.spawn runs it, but forked from a
    server process that has imported torch, transformers and the five scripts once (multiprocessing's forkserver).
    A spawned process imports them itself: seconds of CPU per rank, in every multi-process test.  The server
    forks before any of its threads exist, and the test's own process is never forked."""
    import multiprocessing

    import torch.multiprocessing as mp
    method = "spawn"  # where there is no fork server (Windows)
    if "forkserver" in multiprocessing.get_all_start_methods():
        method = "forkserver"
        multiprocessing.set_forkserver_preload(["torch", "transformers", "blip2_pformer", "dlip", "negclip",
                                                "perceiver_caption", "imagechat_warmup"])

    def run(fn, args=(), nprocs=2):
        mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method=method)
    return run


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

"""Test-session setup: an isolated artefact cache, shared by every test of the session.

Smoke-mode toy artefacts are then built once per session (by whichever test needs them first) and
never touch the user's own cache. Set L2P_TEST_CACHE to reuse a cache across sessions.
"""
import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    path = os.environ.get("L2P_TEST_CACHE") or str(tmp_path_factory.mktemp("l2p_cache"))
    old = os.environ.get("L2P_CACHE")
    os.environ["L2P_CACHE"] = path
    yield path
    if old is None:
        os.environ.pop("L2P_CACHE", None)
    else:
        os.environ["L2P_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every model in the suite is tiny: a second thread only adds OpenMP barrier waits (far slower when busy).

    Cached toy artefacts (and `build_toy_world`) use L2P_BUILD_THREADS, so it is set to 1 too.
    """
    n, env = torch.get_num_threads(), os.environ.get("L2P_BUILD_THREADS")
    torch.set_num_threads(1)
    os.environ["L2P_BUILD_THREADS"] = "1"
    yield
    torch.set_num_threads(n)
    if env is None:
        os.environ.pop("L2P_BUILD_THREADS", None)
    else:
        os.environ["L2P_BUILD_THREADS"] = env

"""Fixtures of the slicing tests: tiny models of every family with random-ranking artifacts, made once."""

import pytest

from tests.factory import Source, dense_model, make_model_dir


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """get(name, unit, **config_overrides) -> Source; model directories and artifacts are made once."""
    models, cache = {}, {}

    def get(name, unit="q_head", **overrides):
        mkey = (name, tuple(sorted(overrides.items())))
        if mkey not in models:
            root = tmp_path_factory.mktemp(name)
            model_dir = make_model_dir(root, name, **overrides)
            models[mkey] = (root, model_dir, dense_model(model_dir))
        if (mkey, unit) not in cache:
            root, model_dir, dense = models[mkey]
            cache[mkey, unit] = Source(model_dir, dense, root, unit)
        return cache[mkey, unit]
    return get

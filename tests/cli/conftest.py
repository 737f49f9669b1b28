import pytest

from tests.factory import Source, dense_model, make_model_dir


@pytest.fixture(scope="module")
def q_head_artifact(tmp_path_factory):
    """A GISP artifact of a tiny random Llama (GQA, q_head units), one per test module."""
    root = tmp_path_factory.mktemp("q_head")
    model_dir = make_model_dir(root, "llama-gqa")
    return Source(model_dir, dense_model(model_dir), root, "q_head").artifact

"""The padded-gather rule: head rows, and the padding rows a loader may take from the file instead of zeros."""

from gisp_deploy.layout import head_rows, padding_from_file


def test_head_rows_expand_heads_and_padding():
    assert head_rows([2, -1, 0], 3) == [6, 7, 8, -1, -1, -1, 0, 1, 2]
    assert head_rows([], 4) == []


def test_padding_from_file_fills_runs_only_where_the_consumer_cancels_them():
    rows = head_rows([0, -1, -1, 4, 5, -1], 2)  # two padded groups
    q = "model.layers.1.self_attn.q_proj.weight"
    assert padding_from_file(q, rows) == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]
    assert padding_from_file("model.layers.1.self_attn.q_proj.bias", rows) == padding_from_file(q, rows)
    assert padding_from_file("model.layers.0.mlp.up_proj.weight", [3, 4, -1, -1]) == [3, 4, 5, 6]
    for key in ("model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.o_proj.weight",
                "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
        assert padding_from_file(key, rows) is None  # zeros that matter, or no layer tensor
    assert padding_from_file(q, head_rows([0, 1], 2)) is None  # nothing to fill
    assert padding_from_file(q, [-1, -1, 4]) is None  # no row before the padding
    assert padding_from_file(q, None) is None and padding_from_file(q, []) is None

"""Block ranges: explicit lists, "start:stop" with negatives, and the structured default."""

import pytest

from obsdiff.config import ConfigError, parse_blocks, resolve


@pytest.mark.parametrize(
    "blocks, expected",
    [(None, None), (3, [3]), ([0, 2], [0, 2]), ("1:3", [1, 2]), ("1:-1", [1, 2, 3, 4]), ("-2:6", [4, 5])],
)
def test_parse_blocks(blocks, expected):
    assert parse_blocks(blocks, num_layers=6) == expected


@pytest.mark.parametrize("blocks", ["a:b", "3", "1:-1x"])
def test_parse_blocks_rejects_garbage(blocks):
    with pytest.raises(ConfigError, match="pruner.blocks"):
        parse_blocks(blocks, num_layers=6)


def test_structured_default_skips_first_and_last_block(compose_cfg):
    assert resolve(compose_cfg("sparsity=structured")).blocks == [1, 2]  # tiny: 4 blocks
    assert resolve(compose_cfg()).blocks is None  # unstructured: every block
    assert resolve(compose_cfg("sparsity=structured", "pruner.blocks=[0,3]")).blocks == [0, 3]

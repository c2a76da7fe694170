"""bench/gate_prefill.prefill_flops: a prefill behind a cached prefix costs exactly the difference between
encoding everything and encoding the prefix alone (the LM head's last-token cost counted once each)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from gate_prefill import prefill_flops  # noqa: E402

CFG = SimpleNamespace(hidden_size=576, num_hidden_layers=3, num_attention_heads=9, num_key_value_heads=3,
                      head_dim=64, intermediate_size=1536, vocab_size=49152)


@pytest.mark.parametrize("past,new", [(0, 7), (44, 1), (44, 47), (10, 300)])
def test_prefill_behind_a_cache_is_the_difference(past, new):
    head = 2 * CFG.hidden_size * CFG.vocab_size
    assert prefill_flops(CFG, new, past) - head == (prefill_flops(CFG, past + new) - head) - (
        prefill_flops(CFG, past) - head)


def test_attention_grows_quadratically_and_a_cached_prefix_costs_less():
    a, b = prefill_flops(CFG, 100), prefill_flops(CFG, 200)
    assert b > 2 * a - 2 * CFG.hidden_size * CFG.vocab_size  # the attention term is quadratic
    assert prefill_flops(CFG, 50, 50) < prefill_flops(CFG, 100)

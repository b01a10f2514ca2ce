"""Capture installation without an engine: what the routing cache cannot serve is refused."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from moepath.patches.inspection import UnsupportedModelError
from moepath.patches.installation import uses_prefix_caching
from moepath.patches.settings import CaptureSettings


def engine(prefix_caching: bool = True, decode_context_parallel: int = 1):
    """The parts of a vLLM config the check reads."""
    return NS(cache_config=NS(enable_prefix_caching=prefix_caching),
              parallel_config=NS(decode_context_parallel_size=decode_context_parallel))


def test_a_routing_cache_is_kept_only_where_vllm_reads_its_prefix_cache():
    assert uses_prefix_caching(engine(), CaptureSettings(dir="t"))
    assert not uses_prefix_caching(engine(prefix_caching=False), CaptureSettings(dir="t"))
    # without prefix caching nothing is refused
    assert not uses_prefix_caching(engine(False, decode_context_parallel=2),
                                   CaptureSettings(dir="t", store_probs=True))


@pytest.mark.parametrize(("config", "settings", "message"), [
    (engine(), CaptureSettings(dir="t", store_probs=True),
     "store_probs keeps every token's router distribution.*--no-enable-prefix-caching"),
    (engine(decode_context_parallel=2), CaptureSettings(dir="t"),
     "decode context parallelism spreads each KV block.*--no-enable-prefix-caching"),
])
def test_what_the_routing_cache_cannot_serve_is_refused_at_load(config, settings, message):
    with pytest.raises(UnsupportedModelError, match=message):
        uses_prefix_caching(config, settings)

"""zentorch names reordered weight buffers by address for the life of the process: a freed
model's parameters stay taken while another model is alive, the cache is forgotten when
the last one goes, and an in-place reload (which forgets it at once) is refused while
another model is alive. No zentorch needed: its cache is replaced by a recorder."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from moepath.patches import reload, zentorch_cache


@pytest.fixture
def forgotten(monkeypatch) -> list[str]:
    """No tracked model alive; each forgetting of zentorch's cache is recorded."""
    calls: list[str] = []
    monkeypatch.setattr(zentorch_cache, "_live_models", 0)
    monkeypatch.setattr(zentorch_cache, "_retired", [])
    monkeypatch.setattr(zentorch_cache, "forget_weight_caches", lambda: calls.append("forget"))
    return calls


def test_a_freed_models_weights_stay_taken_until_the_last_model_goes(forgotten):
    first, second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    first_weight = weakref.ref(first.weight)
    zentorch_cache.track(first)
    zentorch_cache.track(second)
    assert not zentorch_cache.sole_model()

    del first
    gc.collect()
    assert first_weight() is not None, "its address could be handed to the next model"
    assert forgotten == [] and zentorch_cache.sole_model()

    del second
    gc.collect()
    assert first_weight() is None
    assert forgotten == ["forget"]


class CPUUnquantizedExperts:
    """Stands in for vLLM's CPU experts kernel on the Zen platform (read by class name)."""

    _use_zentorch = True


def model_with_zentorch_experts() -> torch.nn.Module:
    """A module laid out as vLLM's fused-MoE layer: ``quant_method.moe_kernel.fused_experts``."""
    layer = torch.nn.Module()
    layer.w13_weight = torch.nn.Parameter(torch.zeros(2, 4, 4), requires_grad=False)
    kernel = type("Kernel", (), {"fused_experts": CPUUnquantizedExperts()})()
    layer.quant_method = type("Method", (), {"moe_kernel": kernel})()
    model = torch.nn.Module()
    model.moe = layer
    return model


def test_a_reload_under_zentorch_is_refused_while_another_model_is_alive(forgotten):
    model, other = model_with_zentorch_experts(), torch.nn.Linear(8, 8)
    zentorch_cache.track(model)
    reload.check_reloadable(model, torch.device("cpu"))  # the only model: allowed

    zentorch_cache.track(other)
    with pytest.raises(reload.ReloadUnsupported, match=(
            "^another model in this process holds zentorch-reordered weights, whose cache a "
            "reload must forget$")):
        reload.check_reloadable(model, torch.device("cpu"))
    del other
    gc.collect()
    reload.check_reloadable(model, torch.device("cpu"))

"""Capture settings as a worker reads them from vLLM's ``additional_config``."""

from __future__ import annotations

import pytest

from moepath.patches.settings import CaptureSettings


def test_capture_settings_are_validated_where_the_engine_reads_them():
    with pytest.raises(ValueError, match="needs 'dir'"):
        CaptureSettings.parse({"trace_all": True})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['dirr'\]"):
        CaptureSettings.parse({"dirr": "x"})
    settings = CaptureSettings.parse({"dir": "x"})
    assert len(settings.run) == 8 and settings.shard_tokens == 65_536


def test_the_store_kind_reaches_the_worker_validated():
    assert CaptureSettings.parse({"dir": "x"}).store == "per-token"
    assert CaptureSettings.parse({"dir": "x", "store": "per-sample"}).store == "per-sample"
    with pytest.raises(ValueError, match=r"\['store'\] is 'per-layer'; pass one of per-token, "
                                         r"per-sample"):
        CaptureSettings.parse({"dir": "x", "store": "per-layer"})
    with pytest.raises(ValueError, match="'store_probs' keeps per-token distributions"):
        CaptureSettings.parse({"dir": "x", "store": "per-sample", "store_probs": True})

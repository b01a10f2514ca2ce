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

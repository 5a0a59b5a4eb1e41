"""The scaling experiment measures real forward passes in child processes and reports OOM cleanly."""

from __future__ import annotations

from lol_models.scaling import measure, scaling


def test_glnet_runs_at_gpt3_125m_and_reports_time_and_memory():
    point = measure("glnet", "125M", repeats=1)
    assert point.status == "ok" and point.forward_ms > 0 and point.peak_rss_mb > 100 and point.parameters > 0


def test_out_of_memory_ends_a_model_series_cleanly():
    points = scaling(["mlp_dense"], sizes=["125M", "350M"], memory_limit_gb=1.5, repeats=1)
    assert [p.size for p in points] == ["125M"]  # the series stops at the first failure
    assert points[0].status == "out of memory" and points[0].forward_ms is None

"""benchmarks/attn_timeline.py's analysis (no GPU): how a CTA's pages are
counted, and the balance bounds published with session 13's timeline."""

from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "h100-session13"


@pytest.fixture(scope="module")
def timeline():
    return load_benchmark("attn_timeline")


@pytest.mark.parametrize("kept, splits", [(7, 3), (128, 4), (2, 5), (0, 2), (16, 1)])
def test_split_pages_share_out_every_kept_page(timeline, kept, splits):
    shares = [timeline.split_pages(kept, s, splits) for s in range(splits)]
    assert sum(shares) == kept
    assert max(shares) - min(shares) <= 1


def test_balance_bounds_by_hand(timeline):
    """Two row-heads of two CTAs, 2 pages each. Row-head 0's CTAs stream at 1
    and 0.5 pages/us, row-head 1's at 0.5 and 0.5: inside a row-head they end
    at 4 / 1.5 and 4 / 1 us; across all, 8 pages / 2.5 pages/us."""
    bounds = timeline.balance_bounds([2.0, 4.0, 4.0, 4.0], batch=2, splits=2, kept=4, start_us=0.0)
    assert bounds == {"measured_max": 4.0, "row_head_balanced_max": 4.0, "all_balanced": 3.2}
    # Streaming from t = 1: rates 1, 1/3 and 1/3, 1/3 pages/us.
    later = timeline.balance_bounds([3.0, 7.0, 7.0, 7.0], batch=2, splits=2, kept=4, start_us=1.0)
    assert later["row_head_balanced_max"] == pytest.approx(1 + 4 / (2 / 3), abs=1e-3)
    assert later["all_balanced"] == pytest.approx(1 + 8 / 2.0, abs=1e-3)


def test_published_bounds(timeline):
    """The README's figures: at 16 x 32K and 1/16 the main loop ends at ~52-53
    us; shared inside row-heads ~51, across all CTAs ~46."""
    for bounds in timeline.analyze(RESULTS / "timeline_sm_rows16.json"):
        assert 52 <= bounds["measured_max"] <= 54
        assert 50 <= bounds["row_head_balanced_max"] <= 52
        assert 46 <= bounds["all_balanced"] <= 47

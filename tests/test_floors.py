"""benchmarks/floors.py: the bytes floors published with the speed targets."""

import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "h100-session12"


@pytest.fixture(scope="module")
def floors():
    return load_benchmark("floors")


@pytest.mark.parametrize("dtype", ["int8", "float32"])
def test_layer_bytes_equal_what_ops_py_counted_on_the_gpu(floors, dtype):
    """The one-layer floor reads the bytes ops.py counts as the step's minimum
    (bytes_min), at the same 16 x 32K and 1/16."""
    recorded = json.loads((RESULTS / f"whole_step_after_{dtype}_run1.json").read_text())
    row = recorded["rows"][0] if isinstance(recorded, dict) else recorded[0]
    result = floors.main(["--centroid-dtype", dtype])
    assert sum(result["layer"]["bytes"].values()) == row["bytes_min"]
    # And no measured whole step beat its floor.
    assert row["whole_ms"] >= result["layer"]["floor_ms"]


def test_step_floor_adds_its_parts(floors):
    step = floors.main(["--gemm-ms", "5", "--dense-tok-s", "500"])["step"]
    # 12 rows x 2052 pages x 8 heads: dense reads 8 KB a page-head, sparse 1/16 of
    # that plus a 640 B summary.
    page_heads = 12 * 2052 * 8
    dense_ms = page_heads * 8192 / 3040e9 * 1e3
    sparse_ms = page_heads * (8192 / 16 + 640) / 3040e9 * 1e3
    assert step["dense_layer_ms"] == pytest.approx(dense_ms, abs=1e-3)
    assert step["sparse_layer_ms"] == pytest.approx(sparse_ms, abs=1e-4)
    assert step["floor_ms"] == pytest.approx(5 + 2 * dense_ms + 30 * sparse_ms, abs=0.01)
    assert step["dense_step_ms"] == pytest.approx(24.0)
    assert step["best_speedup"] == pytest.approx(24.0 / step["floor_ms"], abs=0.01)

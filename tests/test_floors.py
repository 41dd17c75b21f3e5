"""benchmarks/floors.py: the bytes floors published with the speed targets."""

import json

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def floors():
    return load_benchmark("floors")


@pytest.fixture(scope="module")
def ops():
    return load_benchmark("ops")


@pytest.mark.parametrize("dtype", ["int8", "float32"])
def test_layer_bytes_equal_what_ops_py_counts(floors, ops, dtype):
    """The one-layer floor reads the bytes ops.py counts as the step's minimum
    (bytes_min), at the same 16 x 32K (2048 pages) and 1/16 (128 kept pages)."""
    result = floors.main(["--centroid-dtype", dtype])
    assert sum(result["layer"]["bytes"].values()) == ops.bytes_min(16, 128, 2048, dtype)


def test_measured_whole_steps_against_their_floors(floors, ops, tmp_path):
    """An ops.py result, written here: an int8 row at the time an H100 measured
    and a float32 row faster than any GPU could run it. Each row's floor counts
    the bytes ops.py counted, and only the impossible row is below its floor."""
    rows = [
        {"centroid_dtype": "int8", "whole_ms": 0.1791},
        {"centroid_dtype": "float32", "whole_ms": 0.05},
    ]
    for row in rows:
        row.update(batch=16, context=32768, budget="1/16", kept_pages=128)
        row["bytes_min"] = ops.bytes_min(16, 128, 2048, row["centroid_dtype"])
    path = tmp_path / "ops.json"
    path.write_text(json.dumps({"gpu": "synthetic", "rows": rows}))
    measured = floors.main(["--measured", str(path)])["measured"]
    assert [m["floor_bytes"] for m in measured] == [r["bytes_min"] for r in rows]
    assert [m["below_floor"] for m in measured] == [False, True]
    assert measured[0]["floor_ms"] == pytest.approx(0.0993, abs=1e-4)


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

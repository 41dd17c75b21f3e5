"""benchmarks/read_floor.py without a GPU: how many buffers a timed graph cycles through."""

import sys

from benchmark_scripts import load_benchmark


def test_buffers_cover_four_l2_sizes_and_at_least_two():
    read_floor = load_benchmark("read_floor")
    l2 = 50 << 20
    for nbytes in (1 << 20, 33_500_000, 134_200_000, 2_147_000_000):
        count = read_floor.buffer_count(nbytes, l2)
        assert count >= 2
        assert count * nbytes >= 4 * l2 or count == 2
        # No more than needed: one fewer would not cover 4x L2 (or would be < 2).
        assert (count - 1) * nbytes < 4 * l2 or count == 2
    assert read_floor.buffer_count(134_200_000, l2) == 2
    assert read_floor.buffer_count(33_500_000, l2) == 7


def test_without_a_gpu_it_exits_with_a_message(monkeypatch):
    read_floor = load_benchmark("read_floor")
    monkeypatch.setattr(read_floor.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["read_floor.py"])
    try:
        read_floor.main()
    except SystemExit as exc:
        assert "needs a CUDA GPU" in str(exc.code)
    else:
        raise AssertionError("main() ran without a GPU")

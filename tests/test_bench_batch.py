"""scripts/bench_batch.py --tiny: the batched-decode benchmark runs both implementations and writes its records."""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_batch  # noqa: E402


def test_tiny_run_writes_records(tmp_path):
    out = tmp_path / "batch.json"
    bench_batch.main(["--tiny", "--contexts", "64", "--layers", "1", "--streams", "1,4", "--tokens", "2",
                      "--warm", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["bandwidth_gbs"] > 0
    rows = {(r["impl"], r["streams"]): r for r in data["records"]}
    assert set(rows) == {("ours", 1), ("ours", 4), ("mlx_lm", 1), ("mlx_lm", 4)}
    for r in rows.values():
        assert "error" not in r, r
        assert r["tok_s"] > 0 and r["predicted_tok_s"] > 0 and r["speedup"] > 0
    assert rows["ours", 1]["batch_path_ms_per_step"] > 0
    # 8 experts, top-2: one row reads 2 per layer; four rows with routing that differs by row read more
    assert rows["ours", 1]["experts_measured"] == 2 and rows["ours", 1]["experts_predicted"] == 2
    assert rows["ours", 4]["experts_measured"] > 2.5 and rows["mlx_lm", 4]["experts_measured"] > 2.5
    assert abs(rows["ours", 4]["experts_predicted"] - 8 * (1 - 0.75 ** 4)) < 0.01
    assert 1 < rows["ours", 4]["predicted_speedup"] < 4


def test_tiny_run_with_quantized_caches():
    records, _ = bench_batch.run(argparse.Namespace(
        tiny=True, contexts="64", layers=1, streams="1,3", tokens=2, warm=1, impls="ours", format="q4",
        kv_bits=4, kv_group_size=32))
    assert [r["streams"] for r in records] == [1, 3]
    for r in records:
        assert "error" not in r, r
        assert r["kv_bits"] == 4 and r["tok_s"] > 0

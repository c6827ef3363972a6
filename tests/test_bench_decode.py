"""scripts/bench_decode.py --tiny: the whole-model benchmark runs and writes its records."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_decode  # noqa: E402


def test_tiny_run_writes_records(tmp_path):
    out = tmp_path / "bench.json"
    bench_decode.main(["--tiny", "--contexts", "64", "--layers", "1,2", "--tokens", "3", "--warm", "1",
                       "--steps", "2", "--chunk", "16", "--prefill-steps", "1", "--kernels", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["bandwidth_gbs"] > 0
    rows = {r["impl"]: r for r in data["records"] if "context" in r}
    assert set(rows) == {"ours", "mlx_lm"}
    for r in rows.values():
        assert r["layers"] == [4, 5] and r["context"] == 64
        for key in ("ms_per_token", "floor_ms", "layer_ms", "prefill_ms", "peak_gb", "bound_ms"):
            assert r[key] > 0, (r["impl"], key)
        assert r["ms_per_token_60"] is not None
    kernels = {r["impl"]: r["kernels_per_moe_layer"] for r in data["records"] if "kernels_per_moe_layer" in r}
    assert kernels["ours"] > 10 and kernels["mlx_lm"] > 10


def test_tiny_run_with_quantized_cache(tmp_path):
    out = tmp_path / "bench.json"
    bench_decode.main(["--tiny", "--impls", "ours", "--kv-bits", "4", "--contexts", "64", "--layers", "1,2",
                       "--tokens", "3", "--warm", "1", "--steps", "2", "--chunk", "16", "--prefill-steps", "1",
                       "--json", str(out)])
    (r,) = [r for r in json.loads(out.read_text())["records"] if "context" in r]
    assert r["kv_bits"] == 4 and r["ms_per_token"] > 0 and r["prefill_ms"] > 0

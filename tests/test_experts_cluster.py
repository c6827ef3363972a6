"""--expert-memory under `mlx.launch` (2 ranks on localhost; 4 for `both`), tensor and pipeline.

A tiny model with 16 experts per layer (top-2), converted to 4 bits, loaded by each rank
with a budget of a few slots per layer (misses, evictions and rounds happen): the logits
of a chunked prefill, decode (plain and --kv-bits 8 caches) and batched decode equal one
resident process's, and each rank reads only its share of the experts (pipeline: its
stage's layers; tensor: its slice of gate/up, the whole rows of down, as
io.reader.RangeReader documents). One launch runs every in-process case; others run
`both` on 4 ranks, `minimax-m3 generate` and `minimax-m3 server`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from minimax_m3_mlx import load_model, synthetic
from minimax_m3_mlx.convert import run as conv
from minimax_m3_mlx.io.reader import RangeReader, RowSlice, locate, part_nbytes, read_nbytes
from minimax_m3_mlx.model.experts import EXPERTS, rank_parts

sys.path.insert(0, str(Path(__file__).parent))
from dist_experts import batched, chunked  # noqa: E402
from ring import launch_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "dist_experts.py"
TOP_K, N_EXPERTS = 2, 16
# Intermediate sizes of two quantisation groups (32): every rank's slice is whole groups.
CONFIG = {"num_local_experts": N_EXPERTS, "num_experts_per_tok": TOP_K, "intermediate_size": 64,
          "shared_intermediate_size": 64, "dense_intermediate_size": 64}
CHUNKS = [(0, 13), (13, 14), (14, 45)]  # then decode to SEQ
SEQ = 70  # >> block_size (4) x topk (3): sparse selection drops blocks
TOL = 1e-4


def slot_bytes(folder) -> int:
    """Bytes of one whole expert in every MoE layer."""
    return sum(t.row_nbytes for k, t in locate(folder).items() if EXPERTS in k)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts_cluster")
    config = synthetic.tiny_config(CONFIG)
    synthetic.write_checkpoint(root / "src", config, synthetic.random_weights(config, seed=7), "original")
    for name, dtype in (("q4", None), ("q4-bf16", "bfloat16")):
        conv.convert(str(root / "src"), str(root / name), quantize=True, q_bits=4, q_group_size=32, progress=False,
                     log=lambda *a: None, **({"dtype": dtype} if dtype else {}))
    return root / "q4"


@pytest.fixture(scope="module")
def spec(folder):
    rng = np.random.default_rng(2)
    whole, bf16 = slot_bytes(folder), str(folder.parent / "q4-bf16")
    return {
        "folder": str(folder), "out": str(folder.parent / "out"),
        "tokens": rng.integers(0, 256, (2, SEQ)).tolist(), "chunks": CHUNKS,
        "batch": {"prompts": [rng.integers(0, 256, n).tolist() for n in (5, 37, 60)],
                  "next": rng.integers(0, 256, (3, 6)).tolist()},
        "cases": [
            # tensor: a slot holds half an expert: 3 slots per layer on each rank
            {"name": "tensor", "mode": "tensor", "memory": 3 * whole // 2},
            # pipeline: 4.5 whole-expert slots over the stage's layers: 4 (one MoE layer) or 2 (two)
            {"name": "pipeline", "mode": "pipeline", "memory": 3 * whole // 2},
            {"name": "tensor-too-small", "mode": "tensor", "memory": TOP_K * whole // 2 - 1},
            # bf16 scales and activations: the streamed ranks against the resident ranks
            {"name": "tensor-bf16", "mode": "tensor", "memory": 3 * whole // 2, "folder": bf16},
            {"name": "tensor-bf16-resident", "mode": "tensor", "memory": None, "folder": bf16},
        ],
    }


def _launch(n, spec, out: Path):
    """Run the worker on `n` ranks: (each rank's figures, {(case, rank): logits})."""
    spec = dict(spec, out=str(out))
    out.mkdir()
    (out / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([*launch_args(n), str(WORKER), str(out / "spec.json")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "exited with code" not in run.stdout + run.stderr, \
        run.stdout[-3000:] + run.stderr[-3000:]
    results = [json.loads((out / f"r{r}.json").read_text()) for r in range(n)]
    logits = {(c["name"], r): dict(np.load(out / f"{c['name']}-r{r}.npz")) for c in spec["cases"]
              for r in range(n) if (out / f"{c['name']}-r{r}.npz").exists()}
    return results, logits


@pytest.fixture(scope="module")
def runs(spec):
    return _launch(2, spec, Path(spec["out"]))


@pytest.fixture(scope="module")
def resident(folder, spec):
    model, _ = load_model(folder)
    b = spec["batch"]
    return {"chunked": chunked(model, mx.array(spec["tokens"]), CHUNKS),
            "kv8": chunked(model, mx.array(spec["tokens"][:1]), CHUNKS, kv_bits=8),
            "batched": batched(model, b["prompts"], mx.array(b["next"]))}


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_logits_equal_one_resident_process(runs, resident, mode):
    results, logits = runs
    for r in (0, 1):
        for path in ("chunked", "kv8", "batched"):
            assert rel(logits[mode, r][path], resident[path]) < TOL, (mode, r, path)
        f = results[r][mode]
        assert f["misses"] > 0 and f["hits"] > 0 and f["rounds"] > 0, f  # evictions, steps in rounds
        assert f["chunked_misses"] > 0


def test_both_modes_on_four_ranks(spec, resident, folder):
    """2 pipeline stages of 2 tensor-parallel ranks: each rank streams its slice of its stage's experts."""
    results, logits = _launch(4, dict(spec, cases=[{"name": "both", "mode": "both", "memory": slot_bytes(folder)}]),
                              Path(spec["out"]).parent / "out4")
    for r in range(4):
        for path in ("chunked", "batched"):
            assert rel(logits["both", r][path], resident[path]) < TOL, (r, path)
        f = results[r]["both"]
        assert f["parts"] and f["misses"] > 0 and f["slot_nbytes"] < f["read_nbytes"]
        _reads_are_whole_parts(f)
        assert f["load_bytes"] == f["param_bytes"] == f["plan_bytes"] - f["plan_experts"]
    assert results[0]["both"]["parts"] != results[1]["both"]["parts"]  # the two slices of a stage


def _stored_layer(folder, i):
    prefix = f"language_model.model.layers.{i}{EXPERTS}"
    return {k[len(prefix):]: t for k, t in locate(folder).items() if k.startswith(prefix)}


def test_bf16_ranks_equal_the_resident_ranks(runs):
    """bf16 checkpoint: each rank's streamed logits are its resident tensor-parallel logits."""
    results, logits = runs
    for r in (0, 1):
        for path in ("chunked", "kv8", "batched"):
            assert rel(logits["tensor-bf16", r][path], logits["tensor-bf16-resident", r][path]) < 1e-6, (r, path)
        assert results[r]["tensor-bf16"]["rounds"] > 0 and results[r]["tensor-bf16"]["parts"]


def _reads_are_whole_parts(f):
    """Every read is this rank's part of an expert: each miss's, and the guesses for the next
    layer (some of them cancelled before they began)."""
    assert f["stats_bytes"] == f["reads"] * f["read_nbytes"]
    assert f["misses"] * f["read_nbytes"] <= f["reader_bytes"] <= f["stats_bytes"]


def test_tensor_ranks_stream_their_slices(runs, folder, spec):
    results, _ = runs
    layer = _stored_layer(folder, 1)
    whole = sum(t.row_nbytes for t in layer.values())
    gate_up = sum(t.row_nbytes for k, t in layer.items() if not k.startswith("down_proj"))
    for r in (0, 1):
        f = results[r]["tensor"]
        assert f["slots"] == [3, 3, 3]
        assert f["slot_nbytes"] == whole // 2  # its half of each expert in memory
        # gate/up: its rows only; down: the whole rows, sliced in memory
        assert f["read_nbytes"] == gate_up // 2 + (whole - gate_up)
        _reads_are_whole_parts(f)
        assert {k: tuple(v) for k, v in f["parts"].items()} == {
            k: (p.axis, p.start, p.stop) for k, p in rank_parts(layer, 2, r).items()}
        # no expert was read at load time; the plan check holds without them
        assert f["load_bytes"] == f["param_bytes"] == f["plan_bytes"] - f["plan_experts"]
        assert f["pool_bytes"] == 3 * 3 * whole // 2


def test_pipeline_ranks_stream_their_stages_layers(runs, folder):
    results, _ = runs
    stored = {k for k in locate(folder) if EXPERTS in k}
    seen = []
    for r in (0, 1):
        f = results[r]["pipeline"]
        layers = {int(re.search(r"layers\.(\d+)\.", k).group(1)) for k in f["tensors"]}
        seen += f["tensors"]
        assert f["n_slots"] == {1: 4, 2: 2}[len(layers)] and not f["parts"]
        _reads_are_whole_parts(f)
        assert f["load_bytes"] == f["param_bytes"] == f["plan_bytes"] - f["plan_experts"]
    assert sorted(seen) == sorted(stored)  # each layer's experts streamed by exactly one rank


def test_budget_below_a_ranks_minimum_is_refused_on_every_rank(runs, folder):
    results, logits = runs
    least = TOP_K * slot_bytes(folder) // 2
    for r in (0, 1):
        msg = results[r]["tensor-too-small"]["refused"]
        assert msg.startswith("rank 0: ") and f"below the minimum of {least} bytes" in msg, msg
    assert not any(name == "tensor-too-small" for name, _ in logits)


def test_range_reader_reads_row_parts(folder):
    """Each part of a row, contiguous (one range per row) or strided (whole rows, sliced)."""
    reader = RangeReader()
    t = _stored_layer(folder, 2)["down_proj.scales"]
    whole = reader.read_rows(t, (3, 7))
    for part in (RowSlice(0, 16, 48), RowSlice(1, 1, 2)):
        before = reader.bytes_read
        got = reader.read_rows(t, (3, 7), part)
        index = (slice(None),) * (1 + part.axis) + (slice(part.start, part.stop),)
        np.testing.assert_array_equal(got, whole[index])
        assert reader.bytes_read - before == 4 * read_nbytes(t, part)
        assert got.nbytes == 4 * part_nbytes(t, part)
    assert read_nbytes(t, RowSlice(0, 16, 48)) == t.row_nbytes // 2  # its rows
    assert read_nbytes(t, RowSlice(1, 1, 2)) == t.row_nbytes  # strided: the whole row
    reader.close()


# -- the command under mlx.launch ----------------------------------------------------------------------------
def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _generate_args(folder, *extra):
    return ["-m", "minimax_m3_mlx", "generate", "--model", str(folder), "--prompt", "hello there", "-m", "10",
            "--thinking", "disabled", *extra]


def test_generate_under_mlx_launch_writes_the_resident_text(folder, capsys):
    from minimax_m3_mlx import cli

    assert cli.main(_generate_args(folder)[2:]) == 0  # one process, resident: this one
    alone = capsys.readouterr().out
    memory = str(3 * slot_bytes(folder) // 2)  # 3 slots of half experts per layer on each rank
    both = subprocess.run([*launch_args(2), *_generate_args(folder, "--expert-memory", memory, "--parallel", "tensor")],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    out = both.stdout + both.stderr
    assert both.returncode == 0 and "exited with code" not in out and "[ring]" not in out, out[-3000:]
    assert both.stdout.count("=" * 10) == 2  # one rank printed
    text = both.stdout.split("=" * 10)[1]
    assert text == alone.split("=" * 10)[1] and text.strip()
    assert "Experts: 3 slots per layer on rank 0," in both.stdout


def test_generate_under_mlx_launch_refuses_a_small_budget_in_one_line(folder):
    least = TOP_K * slot_bytes(folder)  # pipeline: the rank with two MoE layers needs the most
    run = subprocess.run([*launch_args(2), *_generate_args(folder, "--expert-memory", str(least // 2),
                                                           "--parallel", "pipeline")],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    out = run.stdout + run.stderr
    errors = [line for line in out.splitlines() if "error:" in line]
    assert "Traceback" not in out and len(errors) == 1, out[-3000:]  # rank 0 says it for both
    assert errors[0].startswith("minimax-m3 generate: error: rank ") and "below the minimum of" in errors[0], errors
    codes = dict(re.findall(r"rank (\d) exited with code (-?\d+)", out))
    assert set(codes) == {"0", "1"} and set(codes.values()) <= {"1", "-15"}, out


class _Ranks:
    """Stands in for a group of `n` ranks: the checks below run before any communication."""

    def __init__(self, n, rank):
        self.n, self.r = n, rank

    def size(self):
        return self.n

    def rank(self):
        return self.r


def test_check_folder_takes_each_ranks_part(folder):
    """The server's check before it listens: a budget that one process could not use (below
    a whole model's minimum) serves two tensor-parallel ranks, whose slots hold half experts."""
    from minimax_m3_mlx.loading import check_folder
    from minimax_m3_mlx.model.experts import ExpertMemoryError

    whole = slot_bytes(folder)
    with pytest.raises(ExpertMemoryError, match=f"below the minimum of {TOP_K * whole} bytes"):
        check_folder(folder, 3 * whole // 2)
    for r in (0, 1):
        check_folder(folder, 3 * whole // 2, group=_Ranks(2, r), mode="tensor")
        with pytest.raises(ExpertMemoryError, match=f"^rank 0: .*below the minimum of {TOP_K * whole // 2} bytes"):
            check_folder(folder, TOP_K * whole // 2 - 1, group=_Ranks(2, r), mode="tensor")
        # pipeline: the stage of two MoE layers needs 2/3 of the budget of one process, the other 1/3
        with pytest.raises(ExpertMemoryError, match="below the minimum of"):
            check_folder(folder, TOP_K * whole // 2, group=_Ranks(2, r), mode="pipeline")


def test_server_under_mlx_launch_streams_experts(folder, tmp_path):
    """`minimax-m3 server --expert-memory` on 2 tensor-parallel ranks, with a budget below one
    process's minimum: it listens, and replies as one resident process does."""
    import signal
    import time
    import urllib.request

    import openai

    from minimax_m3_mlx.serving.server import Server, setup_arg_parser
    from ring import free_port_base

    def ask(port):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="default_model", max_tokens=10,
                                           messages=[{"role": "user", "content": "Hello there!"}])
        return r.choices[0].message.content, r.usage.completion_tokens

    srv = Server(setup_arg_parser().parse_args(["--model", str(folder), "--port", "0", "--thinking", "disabled"]))
    srv.start()
    try:
        want = ask(srv.port)
    finally:
        srv.shutdown()
    port = free_port_base(1)
    cmd = [*launch_args(2), "-m", "minimax_m3_mlx", "server", "--model", str(folder), "--port", str(port),
           "--parallel", "tensor", "--thinking", "disabled", "--expert-memory", str(3 * slot_bytes(folder) // 2)]
    with open(tmp_path / "launch.log", "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        end = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < end, (tmp_path / "launch.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30):
                    break
            except OSError:
                time.sleep(0.5)
        assert ask(port) == want
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

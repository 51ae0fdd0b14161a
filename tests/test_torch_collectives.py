"""The torch.distributed engine's collectives on real gloo ranks (three processes, no Spark): a small allreduce
goes as one allgather and a sum in rank order (``launch.small_allreduce_bytes``), a large one as gloo's ring
allreduce; both give the same sums, the inputs stay unchanged, and the meter counts what each moves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparkml_dist.ui import free_port

REPO = Path(__file__).resolve().parents[1]
WORLD = 3
RANK = """
import datetime, json, os, sys
import torch, torch.distributed as dist
from sparkml_dist.runtime.engines import TorchCollectives

rank, port = int(sys.argv[1]), int(sys.argv[2])
os.environ["GLOO_SOCKET_IFNAME"] = "lo"
store = dist.TCPStore("127.0.0.1", port, WORLD, rank == 0, datetime.timedelta(seconds=60), use_libuv=False)
dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
inputs = {
    "vector": torch.arange(5, dtype=torch.float32) * (rank + 1) + 0.1,
    "scalar": torch.tensor(1.5 * (rank + 1), dtype=torch.float64),
    "matrix": torch.full((2, 3), float(rank), dtype=torch.float16),
    "counts": torch.tensor([rank, 10 * rank], dtype=torch.int64),
    "large": torch.linspace(0, 1, 1000) * (rank + 1),  # 4000 bytes: 12000 gathered, above the 4096 below
}
out = {}
for small in (0, 4096):
    comm = TorchCollectives(rank, WORLD, small_allreduce_bytes=small)
    kept = {k: v.clone() for k, v in inputs.items()}
    sums = {k: comm.allreduce(v, average=False, name=k) for k, v in inputs.items()}
    mean = comm.allreduce(inputs["vector"], average=True, name="mean")
    assert all(torch.equal(inputs[k], kept[k]) for k in inputs), "an input was changed"
    out[small] = {
        "sums": {k: [list(v.shape), str(v.dtype), v.reshape(-1).tolist()] for k, v in sums.items()},
        "mean": mean.tolist(),
        "wire": comm.meter.wire_bytes,
        "payload": comm.meter.payload_bytes,
    }
dist.destroy_process_group()
print(json.dumps(out))
"""


def test_a_small_allreduce_gathers_and_sums_in_rank_order_with_the_same_result_as_gloos_ring():
    port = free_port()
    script = f"WORLD = {WORLD}\n{RANK}"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), str(port)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(WORLD)]  # fmt: skip
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=180)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    ring, small = ([o[k] for o in outs] for k in ("0", "4096"))
    assert all(o == small[0] for o in small), "the ranks' sums differ"  # bit-identical on every rank
    assert all(o["sums"] == ring[0]["sums"] for o in ring)
    sums = small[0]["sums"]
    assert sums["vector"][:2] == [[5], "torch.float32"]
    assert sums["vector"][2] == pytest.approx([0.3, 6.3, 12.3, 18.3, 24.3], rel=1e-6)
    assert sums["scalar"] == [[], "torch.float64", [9.0]]
    assert sums["matrix"] == [[2, 3], "torch.float16", [3.0] * 6]
    assert sums["counts"] == [[2], "torch.int64", [3, 30]]
    for key in sums:  # the same sums either way, up to the order of float additions
        assert sums[key][:2] == ring[0]["sums"][key][:2], key
        assert sums[key][2] == pytest.approx(ring[0]["sums"][key][2], rel=1e-6), key
    assert small[0]["mean"] == pytest.approx(ring[0]["mean"], rel=1e-6)
    assert small[0]["mean"] == pytest.approx([0.1, 2.1, 4.1, 6.1, 8.1], rel=1e-6)
    # metered: payload alike; what each rank sends: a ring's 2(K-1)/K of it, an allgather's K-1
    payload = small[0]["payload"]
    assert payload == ring[0]["payload"] == 20 + 8 + 12 + 16 + 4000 + 20
    gathered = 20 + 8 + 12 + 16 + 20  # everything but "large"
    assert ring[0]["wire"] == payload * 2 * (WORLD - 1) / WORLD
    assert abs(small[0]["wire"] - (gathered * (WORLD - 1) + 4000 * 2 * (WORLD - 1) / WORLD)) < 1e-6

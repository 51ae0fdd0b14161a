"""The peers to beat (issue 31): what a user writes with PySpark's own TorchDistributor and plain DDP, or
with Horovod's own Spark launcher (``horovod.spark.run``) and its DistributedOptimizer.

    .venv/bin/python bench/peer.py MANIFEST_URL --epochs 4 --target 0.1681 [--launcher torchdistributor|horovod]

Each rank reads its shard's Parquet files into memory with ``pyarrow.parquet.read_table``, trains a logistic
model with DDP (gloo) or Horovod, Adam, a batch per rank, and evaluates on the validation split at each epoch
end. No
checkpoints, no tracking, no checks: deliberately the short script a user would write. Prints one JSON line:
per-epoch seconds (training + validation, as our runs log ``epoch_s``), validation log-loss, the seconds to
the first epoch at or below ``--target``, and the job's wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def train(manifest_url: str, epochs: int, lr: float, batch: int, seed: int, engine: str = "ddp") -> dict:
    """Runs on each rank: TorchDistributor's (env: RANK, WORLD_SIZE, MASTER_ADDR/PORT) or horovod.spark's."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from torch import nn

    if engine == "ddp":
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        import horovod.torch as hvd

        hvd.init()
        rank, world = hvd.rank(), hvd.size()
    root = manifest_url.removeprefix("file://")
    with open(os.path.join(root, "_manifest.json")) as f:
        manifest = json.load(f)

    feat, label = manifest["features_col"], manifest["label_col"]

    def load(shard: dict) -> tuple[torch.Tensor, torch.Tensor]:
        tables = [pq.read_table(os.path.join(root, e["path"]), columns=[feat, label]) for e in shard["files"]]
        xs = [np.stack(t.column(feat).to_numpy(zero_copy_only=False)) for t in tables]
        ys = [t.column(label).to_numpy() for t in tables]
        return torch.from_numpy(np.concatenate(xs).astype(np.float32)), torch.from_numpy(np.concatenate(ys)).long()

    x, y = load(manifest["train"][rank])
    vx, vy = load(manifest["validation"])
    torch.manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    if engine == "ddp":
        model: nn.Module = nn.parallel.DistributedDataParallel(nn.Linear(x.shape[1], 2))
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        steps = min(_all_gather_int(len(y), world)) // batch  # equal steps on every rank
    else:
        model = nn.Linear(x.shape[1], 2)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = hvd.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=lr), model.named_parameters())
        steps = min(hvd.allgather_object(len(y))) // batch
    out: dict = {"epoch_s": [], "val_log_loss": []}
    gen = torch.Generator().manual_seed(seed + rank)
    for _ in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(y), generator=gen)
        model.train()
        for s in range(steps):
            idx = perm[s * batch : (s + 1) * batch]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val = float(loss_fn(model(vx), vy))
        out["epoch_s"].append(time.perf_counter() - t0)
        out["val_log_loss"].append(val)
    if engine == "ddp":
        dist.destroy_process_group()
    else:
        hvd.shutdown()
    return out


def _all_gather_int(value: int, world: int) -> list[int]:
    import torch
    import torch.distributed as dist

    parts = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(parts, torch.tensor([value]))
    return [int(p) for p in parts]


def main() -> None:
    started = time.monotonic()
    parser = argparse.ArgumentParser()
    parser.add_argument("manifest_url")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.0)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--launcher", choices=["torchdistributor", "horovod"], default="torchdistributor")
    args = parser.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the ranks run on this interpreter
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master(f"local[{args.num_processes}]")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    fn_args = (args.manifest_url, args.epochs, args.lr, args.batch_size, args.seed)
    try:
        if args.launcher == "torchdistributor":
            from pyspark.ml.torch.distributor import TorchDistributor

            distributor = TorchDistributor(num_processes=args.num_processes, local_mode=False, use_gpu=False)
            out = distributor.run(train, *fn_args, "ddp")
        else:
            import horovod.spark

            out = horovod.spark.run(train, args=(*fn_args, "horovod"), num_proc=args.num_processes, use_gloo=True,
                                    start_timeout=120, verbose=0)[0]  # fmt: skip
    finally:
        spark.stop()
    elapsed = [sum(out["epoch_s"][: i + 1]) for i in range(len(out["epoch_s"]))]
    reached = [t for t, v in zip(elapsed, out["val_log_loss"], strict=True) if v <= args.target]
    out.update(time_to_target_s=reached[0] if reached else None, job_wall_s=time.monotonic() - started)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""What is sent: ``none`` (fp32 allreduce), ``fp16`` (half-precision allreduce), ``topk`` (sparse allgather,
lossy with error feedback), ``nonzero`` (sparse allgather of exactly the non-zero entries: exact).

Bytes are measured by the rank's ``Collectives`` from the tensors actually handed to them, so fp16's
half-size payload and top-k's values + indices are what the metrics show.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sparkml_dist.comm.base import COMPRESSORS, Compressor
from sparkml_dist.config import CommConfig
from sparkml_dist.runtime.rank import Collectives


@COMPRESSORS.register("none")
class NoCompression(Compressor):
    """The whole fp32 vector, averaged by one allreduce (ring: 2(K-1)/K x 4 bytes per entry per rank)."""

    name = "none"

    def mean(self, flat: torch.Tensor, comm: Collectives, name: str) -> torch.Tensor:
        return comm.allreduce(flat, average=True, name=name)


@COMPRESSORS.register("fp16")
class Fp16Compression(Compressor):
    """The vector cast to float16 for the allreduce and back (half the bytes; ~3 significant digits)."""

    name = "fp16"
    wire_dtype = torch.float16

    def mean(self, flat: torch.Tensor, comm: Collectives, name: str) -> torch.Tensor:
        return comm.allreduce(flat.to(torch.float16), average=True, name=name).to(flat.dtype)


@COMPRESSORS.register("topk")
class TopKCompression(Compressor):
    """Per tensor, only the ``comm.topk_ratio`` largest-magnitude entries (at least one) are sent: values and
    int32 indices, bit-packed into one float32 buffer for a single allgather. Every rank adds up what all
    ranks sent and divides by K. With ``comm.error_feedback`` what was not sent stays in a per-rank
    residual that is added to the next vector (error feedback, as in Stich et al. 2018 / Lin et al. 2018),
    so nothing is lost, only delayed.

    Bytes per rank per round: 8 x k sent (k = sum over tensors of ceil(ratio x size)); the allgather moves
    (K-1) x that per rank, against 2(K-1)/K x 4 x D for the dense ring.
    """

    name = "topk"

    def __init__(self, cfg: CommConfig, sizes: Sequence[int]) -> None:
        super().__init__(cfg, sizes)
        if sum(sizes) >= 2**31:
            raise ValueError(f"comm.compression=topk packs int32 indices: {sum(sizes)} entries is too many")
        self.ks = [min(n, max(1, int(round(cfg.topk_ratio * n)))) for n in sizes]
        self.residual: torch.Tensor | None = None

    def select(self, acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, flat indices) of the top-k entries by magnitude of each tensor's segment of ``acc``."""
        values, indices = [], []
        offset = 0
        for n, k in zip(self.sizes, self.ks, strict=True):
            seg = acc[offset : offset + n]
            idx = seg.abs().topk(k, sorted=False).indices if k < n else torch.arange(n, device=acc.device)
            values.append(seg[idx])
            indices.append(idx + offset)
            offset += n
        return torch.cat(values), torch.cat(indices)

    def mean(self, flat: torch.Tensor, comm: Collectives, name: str) -> torch.Tensor:
        if self.residual is not None and self.residual.device != flat.device:
            self.residual = self.residual.to(flat.device)  # restored from a checkpoint on the CPU
        acc = flat + self.residual if self.residual is not None else flat.clone()
        values, indices = self.select(acc)
        if self.cfg.error_feedback:
            self.residual = acc
            self.residual[indices] = 0.0
        packed = torch.cat([values.to(torch.float32), indices.to(torch.int32).view(torch.float32)])
        gathered = comm.allgather(packed, name=name).view(comm.world_size, 2, -1)
        total = torch.zeros_like(flat)
        for rank_values, rank_indices in gathered:
            total.index_add_(0, rank_indices.view(torch.int32).to(torch.int64), rank_values)
        return total / comm.world_size

    def state_dict(self) -> dict[str, Any]:
        return {"residual": None if self.residual is None else self.residual.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        residual = state.get("residual")
        self.residual = None if residual is None else residual.clone()


@COMPRESSORS.register("nonzero")
class NonzeroCompression(Compressor):
    """Exactly the non-zero entries of the gradient vector (values and int32 indices, as pairs), in one
    allgather whose sizes may differ per rank; every rank adds up all pairs and divides by K. Exact, so no
    error feedback. Made for sparse inputs: the first layer's gradient is zero outside the features the
    batch touched, so a rank sends 8 x (touched features x outputs + the dense layers) bytes instead of the
    dense 2(K-1)/K x 4 x D; on dense gradients it costs about 4x the fp32 ring, use ``none`` there.
    """

    name = "nonzero"

    def __init__(self, cfg: CommConfig, sizes: Sequence[int]) -> None:
        super().__init__(cfg, sizes)
        if sum(sizes) >= 2**31:
            raise ValueError(f"comm.compression=nonzero packs int32 indices: {sum(sizes)} entries is too many")

    def mean(self, flat: torch.Tensor, comm: Collectives, name: str) -> torch.Tensor:
        idx = flat.nonzero().squeeze(1)
        pairs = torch.empty(len(idx), 2, dtype=torch.float32, device=flat.device)
        pairs[:, 0] = flat[idx].to(torch.float32)
        pairs[:, 1] = idx.to(torch.int32).view(torch.float32)  # bit-packed: the allgather moves bytes
        gathered = comm.allgather(pairs, name=name)
        total = torch.zeros_like(flat)
        where = gathered[:, 1].contiguous().view(torch.int32).to(torch.int64)
        total.index_add_(0, where, gathered[:, 0].to(flat.dtype))
        return total / comm.world_size

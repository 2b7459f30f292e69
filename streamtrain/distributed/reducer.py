"""Step gradients averaged across ranks inside the hooks, in buckets, asynchronously.

On the last micro-batch of a logical step each hook hands its parameter's local step gradient
(the accumulated sum; for a GaLore matrix the projected r x n or m x r sum, P^T sum_i G_i =
sum_i P^T G_i) to `add` with what to do once the average is known. Tensors are packed into
buckets of about `bucket_bytes`; a full bucket is flattened into one fp32 buffer and all-reduced
with async_op=True, so the transfer overlaps the rest of backward. When a bucket is launched the
one before it is waited for and its updates applied: at most two buckets are alive, so gradient
memory stays near a bucket, not a model. `flush` (at the end of backward) sends the last bucket
and applies everything. All ranks see the same hooks in the same order (the same graph), so they
issue the same collectives in the same order.

Collectives that refreshes need (the full gradient of a matrix whose subspace is recomputed, a
basis broadcast from the rank that computed it) go through the same object, synchronously.
"""
import torch
import torch.distributed as dist

BUCKET_BYTES = 25 * 2 ** 20


class BucketReducer:
    def __init__(self, group, world_size: int, bucket_bytes: int = BUCKET_BYTES):
        self.group, self.world_size, self.bucket_bytes = group, world_size, bucket_bytes
        self._bucket, self._bucket_bytes, self._in_flight = [], 0, []
        self.bytes_sent = 0          # all-reduced payload bytes since the counter was reset
        self.full_bytes = 0          # what all-reducing every full gradient would have sent

    # -- the hooks' step gradients -------------------------------------------------------------
    def add(self, tensor: torch.Tensor, apply, full_numel: int) -> None:
        """Average `tensor` across ranks, then call apply(mean). `full_numel`: the elements of the
        parameter's full gradient (what a plain all-reduce would send), for the metrics."""
        self._bucket.append((tensor, apply))
        size = 8 if tensor.dtype == torch.float64 else 4  # bytes per element on the wire
        self._bucket_bytes += tensor.numel() * size
        self.full_bytes += full_numel * size
        if self._bucket_bytes >= self.bucket_bytes:
            self._launch()

    def flush(self) -> None:
        """Send the last bucket and apply every update still waiting."""
        if self._bucket:
            self._launch()
        while self._in_flight:
            self._complete(self._in_flight.pop(0))

    def _launch(self) -> None:
        bucket, self._bucket, self._bucket_bytes = self._bucket, [], 0
        dtype = torch.float64 if any(t.dtype == torch.float64 for t, _ in bucket) else torch.float32
        flat = torch.cat([t.reshape(-1).to(dtype) for t, _ in bucket])  # bf16 sums travel as fp32
        self.bytes_sent += flat.numel() * flat.element_size()
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._in_flight.append((work, flat, bucket))
        while len(self._in_flight) > 1:
            self._complete(self._in_flight.pop(0))

    def _complete(self, entry) -> None:
        work, flat, bucket = entry
        work.wait()
        flat.div_(self.world_size)
        offset = 0
        for tensor, apply in bucket:
            n = tensor.numel()
            apply(flat[offset:offset + n].view(tensor.shape).to(tensor.dtype))
            offset += n

    # -- synchronous collectives for refreshes --------------------------------------------------
    def mean(self, tensor: torch.Tensor, counted: bool = True) -> torch.Tensor:
        """The average of `tensor` over ranks (fp32, or fp64), now. `counted`: add it to the
        traffic the metrics report (a refresh's full gradient is; the step's loss is not)."""
        total = tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32, copy=True)
        dist.all_reduce(total, group=self.group)
        if counted:
            self.bytes_sent += total.numel() * total.element_size()
        return total.div_(self.world_size)

    def maximum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The largest value of a small tensor over ranks (a flag any rank raised), now."""
        result = tensor.clone()
        dist.all_reduce(result, op=dist.ReduceOp.MAX, group=self.group)
        return result

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """`tensor` as rank `src` holds it, on every rank (in place)."""
        dist.broadcast(tensor, src=src, group=self.group)
        self.bytes_sent += tensor.numel() * tensor.element_size()
        return tensor

    def owner(self, index: int) -> int:
        """The rank that computes matrix `index`'s subspace (round robin)."""
        return index % self.world_size

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def reset_counters(self) -> tuple[int, int]:
        sent, full = self.bytes_sent, self.full_bytes
        self.bytes_sent = self.full_bytes = 0
        return sent, full

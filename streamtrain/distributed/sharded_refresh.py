"""GaLore's subspace refresh when each rank holds a shard of the gradient.

A GaLore matrix G (m x n) is sharded on the dimension it does not project: rows G_i when it
projects from the right (basis P = top right singular vectors, n x r), columns G_j from the left
(P = top left singular vectors, m x r). Between refreshes every rank works on its shard alone; a
refresh needs the whole matrix's spectrum. Two ways, both giving every rank the same basis bits:

gather   The matrix's owner rank (index % N, round robin, so a step's refreshes are spread over
         the ranks) gathers the shards, computes the basis exactly as one process does
         (GaLore.new_basis: the randomized range finder or the exact SVD) and broadcasts it.
         Moves (N-1)/N of m x n to the owner and r x (n or m) back; the owner holds m x n once.
sketch   The randomized range finder of optim/projector.randomized_svd with its products split
         over the ranks: the Gaussian sketch Omega (n x s, s = r + oversample) is drawn from the
         shared seed on every rank; a product with the sharded G is either local (its rows or
         columns follow G's shards: all-gathered, then QR on every rank) or a sum over the shards
         (all-reduced); the last small SVD (s x n) runs on every rank. Moves about
         (2 + 2 q)(m + n) s per matrix (q power iterations) and never holds m x n; every rank
         factorises every refreshing matrix.

Both compute what one process computes from the same gradient, up to the order of summation
(tests/test_fsdp.py). Measured on 2 gloo ranks (profiles/fsdp-refresh.md): the gather was 1.0-1.7x
faster on every shape tried and is exact to one process's basis; the sketch sent 0.3-0.4x the bytes
at ranks 32-64 but 1.2-2x at 128-512, and at rank 1024 of a 4096 x 11008 matrix it would move
about twice the whole matrix per rank. So `gather` is the default; `sketch` pays on bytes when
s(m + n)(2 + 2q) is well below m n (s below ~490 on 7B's MLP matrices).
A matrix whose sketch would span its smaller side (s >= min(m, n)) or with svd='exact' refreshes
by gather whatever is chosen.
"""
import math

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import is_fake

from ..optim.projector import stable_svd
from ..optim.state import working

REFRESH_METHODS = ("gather", "sketch")


def sharded_basis(shards, rule, state: dict, local_grad: torch.Tensor, dim: int) -> torch.Tensor:
    """The new basis (basis rows x rank) of `rule`'s matrix from this rank's shard, on every rank."""
    m, n = global_shape(shards, local_grad, dim)
    sketch = state["rank"] + rule.oversample
    if shards.refresh == "sketch" and rule.svd == "randomized" and sketch < min(m, n) and not is_fake(local_grad):
        return sketched_basis(shards, rule, state, working(local_grad), dim, (m, n))
    return gathered_basis(shards, rule, state, local_grad, dim, (m, n))


def global_shape(shards, local: torch.Tensor, dim: int) -> tuple[int, int]:
    sizes = torch.tensor([local.shape[dim]], dtype=torch.int64)
    if not is_fake(local):
        dist.all_reduce(sizes, group=shards.group)
        full = int(sizes.item())
    else:  # the planner's fake ranks: rank 0 holds the largest chunk
        full = local.shape[dim] * shards.world_size
    shape = list(local.shape)
    shape[dim] = full
    return tuple(shape)


# -- gather on the owner ---------------------------------------------------------------------------
def gathered_basis(shards, rule, state, local_grad, dim, shape) -> torch.Tensor:
    owner = shards.owner(state["index"])
    basis_rows = shape[0] if state["side"] == "left" else shape[1]
    basis = torch.empty(basis_rows, state["rank"], dtype=state["basis"].dtype, device=local_grad.device)
    full = gather_to(shards, local_grad, dim, shape[dim], owner)
    if shards.rank == owner:
        basis.copy_(rule.new_basis(state, full))
    del full
    dist.broadcast(basis, src=owner, group=shards.group)
    shards.bytes_sent += basis.numel() * basis.element_size()
    return basis


def gather_to(shards, local: torch.Tensor, dim: int, full: int, owner: int) -> torch.Tensor | None:
    """The whole matrix on `owner` from every rank's shard along `dim` (None elsewhere)."""
    padded = padded_shard(local, dim, chunk_size(full, shards.world_size))
    buffers = [torch.empty_like(padded) for _ in range(shards.world_size)] if shards.rank == owner else None
    dist.gather(padded, buffers, dst=owner, group=shards.group)
    shards.bytes_sent += padded.numel() * padded.element_size()
    if buffers is None:
        return None
    return torch.cat(buffers, dim=dim).narrow(dim, 0, full)


def chunk_size(full: int, world_size: int) -> int:
    """The rows (or columns) of the first ranks' shards: torch.chunk's split, which FSDP2 uses."""
    return math.ceil(full / world_size)


def padded_shard(local: torch.Tensor, dim: int, chunk: int) -> torch.Tensor:
    """`local` padded with zeros along `dim` to `chunk` (collectives move equal sizes), contiguous."""
    missing = chunk - local.shape[dim]
    if missing == 0:
        return local.contiguous()
    pad_shape = list(local.shape)
    pad_shape[dim] = missing
    return torch.cat([local, local.new_zeros(pad_shape)], dim=dim)


def all_gather_along(shards, local: torch.Tensor, dim: int, full: int) -> torch.Tensor:
    """Every rank's shard along `dim`, concatenated, on every rank."""
    padded = padded_shard(local, dim, chunk_size(full, shards.world_size))
    buffers = [torch.empty_like(padded) for _ in range(shards.world_size)]
    dist.all_gather(buffers, padded, group=shards.group)
    shards.bytes_sent += padded.numel() * padded.element_size()
    return torch.cat(buffers, dim=dim).narrow(dim, 0, full)


def summed(shards, t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, group=shards.group)
    shards.bytes_sent += t.numel() * t.element_size()
    return t


def my_slice(shards, full: int) -> slice:
    chunk = chunk_size(full, shards.world_size)
    start = min(shards.rank * chunk, full)
    return slice(start, min(start + chunk, full))


# -- the distributed range finder ------------------------------------------------------------------
def sketched_basis(shards, rule, state, a: torch.Tensor, dim: int, shape) -> torch.Tensor:
    """randomized_svd's basis with the products split over the shards: rows (dim 0, a right
    projection) or columns (dim 1, a left one). Same sketch Omega as one process (shared seed)."""
    from ..rules.galore import sketch_seed
    m, n = shape
    s = state["rank"] + rule.oversample
    generator = torch.Generator(device=a.device).manual_seed(sketch_seed(rule.seed, state))
    omega = torch.randn(n, s, generator=generator, dtype=a.dtype, device=a.device)
    if dim == 0:
        return row_sharded_basis(shards, a, omega, m, rule.power_iters, state)
    return column_sharded_basis(shards, a, omega, n, rule.power_iters, state)


def row_sharded_basis(shards, a, omega, m: int, power_iters: int, state) -> torch.Tensor:
    """a = rows a_i of G: G Omega and G Q are row-local (gathered for the QR), G^T Q = sum a_i^T Q_i."""
    rows = my_slice(shards, m)
    q = torch.linalg.qr(all_gather_along(shards, a @ omega, 0, m)).Q                    # m x s
    for _ in range(power_iters):
        q = torch.linalg.qr(summed(shards, a.T @ q[rows])).Q                           # n x s
        q = torch.linalg.qr(all_gather_along(shards, a @ q, 0, m)).Q                   # m x s
    _, _, vh = stable_svd(summed(shards, q[rows].T @ a))                               # s x n
    return basis_columns(vh[:state["rank"]].T, state)


def column_sharded_basis(shards, a, omega, n: int, power_iters: int, state) -> torch.Tensor:
    """a = columns a_j of G: G Omega = sum a_j Omega_j, G^T Q is column-local, Q^T G gathered."""
    cols = my_slice(shards, n)
    q = torch.linalg.qr(summed(shards, a @ omega[cols])).Q                             # m x s
    for _ in range(power_iters):
        q_n = torch.linalg.qr(all_gather_along(shards, a.T @ q, 0, n)).Q               # n x s
        q = torch.linalg.qr(summed(shards, a @ q_n[cols])).Q                           # m x s
    u_small, _, _ = stable_svd(all_gather_along(shards, q.T @ a, 1, n))                # s x n
    return basis_columns(q @ u_small[:, :state["rank"]], state)


def basis_columns(basis: torch.Tensor, state) -> torch.Tensor:
    return basis.to(state["basis"].dtype)

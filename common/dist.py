"""Distributed plumbing: one code path for `python x.py` and `torchrun x.py`.

`setup_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and falls back to a single
process when it is absent.  Backend: nccl on GPU, gloo on CPU.  Model code never calls torch.distributed;
scripts pass the `Dist` record (rank, world size, device) where it is needed.
"""
import datetime
import inspect
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def _pick_device(device, local_rank):
    """torchrun gives each process LOCAL_RANK and every GPU of the node; launchers that bind one GPU per process
    (SLURM --gpus-per-task=1, CUDA_VISIBLE_DEVICES per rank) leave each process one visible GPU, cuda:0."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        n = torch.cuda.device_count()
        if n == 0:  # else torch's own error comes at the first tensor moved, far from the flag
            build = ", a CPU-only build" if torch.version.cuda is None else ""
            raise RuntimeError(f"--device {device}: this process sees no CUDA GPU (torch {torch.__version__}{build}); "
                               "use --device auto or cpu")
        index = int(device.split(":")[1]) if ":" in device else 0 if n == 1 else local_rank
        if index >= n:
            raise RuntimeError(f"--device {device}: only {n} GPUs are visible to this process" if ":" in device else
                               f"LOCAL_RANK {local_rank} but only {n} GPUs are visible to this process: launch "
                               f"at most {n} processes per node, or bind one GPU per process")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(device)


def setup_distributed(device="auto"):
    """Initialise the process group when launched by torchrun; otherwise return a one-process `Dist`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world_size > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Dist(rank, local_rank, world_size, dev)


def cleanup_distributed():
    """Leave the process group.  On gloo, ranks first wait for each other: a rank that tears its connections down
    while a peer still finishes its last collective aborts the peer ("terminate called without an active
    exception").  The wait is bounded, so a run whose other rank failed still exits."""
    if tdist.is_initialized():
        if tdist.get_backend() == "gloo" and tdist.get_world_size() > 1:
            last = torch.zeros(1)  # alive until the group is gone
            try:
                tdist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
                # torch < 2.8 frees a gloo group while holding the GIL and waits for its worker threads; a worker
                # that is still freeing a finished collective (a barrier holds the collectives before it) needs
                # the GIL for their Python tensors: a deadlock (pytorch PR 154976).  One more collective, on a
                # tensor Python still holds, and a pause, both with the GIL released, let the workers finish.
                tdist.all_reduce(last)
                time.sleep(0.05)
            except RuntimeError:
                pass  # a peer is gone: nothing left to wait for
        tdist.destroy_process_group()


def _active():
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def world_size():
    return tdist.get_world_size() if _active() else 1


def rank():
    return tdist.get_rank() if _active() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient of every rank's copy and returns this rank's slice.

    Each rank computes the loss over the whole gathered batch; DDP then averages parameter gradients over ranks.
    Summing here and averaging there gives exactly the gradient of one process holding the global batch.
    """

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(tdist.get_world_size())]
        tdist.all_gather(parts, x.contiguous())
        ctx.n = x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        tdist.all_reduce(grad)  # sum over ranks
        start = tdist.get_rank() * ctx.n  # assumes equal local batch sizes (drop_last / equal shards)
        return grad[start:start + ctx.n]


def all_gather_with_grad(x):
    """(B, ...) on each rank -> (world*B, ...) in rank order; gradients flow back to the local slice."""
    return _GatherWithGrad.apply(x) if _active() else x


@torch.no_grad()
def all_gather_no_grad(x):
    if not _active():
        return x
    parts = [torch.empty_like(x) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def _exchange(tensors, sources):
    """Point to point: send tensors[r] to each rank r (None: nothing), receive from each rank r a tensor
    shaped like sources[r] (None: nothing); returns the received tensors by rank."""
    got, ops = {}, []
    for r, t in tensors.items():
        if t is not None and t.shape[0]:
            ops.append(tdist.P2POp(tdist.isend, t.contiguous(), r))
    for r, like in sources.items():
        if like is not None and like.shape[0]:
            got[r] = torch.empty_like(like)
            ops.append(tdist.P2POp(tdist.irecv, got[r], r))
    for req in tdist.batch_isend_irecv(ops) if ops else ():
        req.wait()
    return got


class _FetchRows(torch.autograd.Function):
    """Rows other ranks hold, moved point to point; backward sends their gradients back to the owners."""

    @staticmethod
    def forward(ctx, x, send, recv):
        # send[r]: my local rows rank r asked for; recv[r]: where the rows from rank r go in my output
        n = sum(len(v) for v in recv.values())
        got = _exchange({r: x[idx] for r, idx in send.items()},
                        {r: x.new_empty((len(pos),) + x.shape[1:]) for r, pos in recv.items()})
        out = x.new_empty((n,) + x.shape[1:])
        for r, pos in recv.items():
            if len(pos):
                out[pos] = got[r]
        ctx.send, ctx.recv, ctx.shape = send, recv, x.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        got = _exchange({r: grad[pos] for r, pos in ctx.recv.items()},
                        {r: grad.new_empty((len(idx),) + grad.shape[1:]) for r, idx in ctx.send.items()})
        gx = grad.new_zeros(ctx.shape)
        for r, idx in ctx.send.items():
            if len(idx):
                gx.index_add_(0, idx, got[r])
        return gx, None, None


def fetch_rows(x, wanted):
    """x (B, ...): this rank's rows of a global batch of world * B; wanted (world * K,): every rank's K wanted
    global row indices, all-gathered.  Returns (R, ...): the rows this rank wanted that other ranks hold, in the
    order it wanted them (its own rows it reads locally).  Moves R rows per rank where an all-gather would move
    (world - 1) * B, with gradients back to the owners.  Every rank must use its output in its loss, an empty one
    too, so every rank's backward takes part in the exchange."""
    if not _active():
        return x[:0]
    world, me, B = tdist.get_world_size(), tdist.get_rank(), x.shape[0]
    w = wanted.view(world, -1).tolist()  # (world, K): a small host copy, the plan every rank computes alike
    owner = lambda g: g // B  # noqa: E731
    send = {r: torch.tensor([g % B for g in w[r] if owner(g) == me], dtype=torch.long, device=x.device)
            for r in range(world) if r != me}
    mine = [g for g in w[me] if owner(g) != me]
    recv = {r: torch.tensor([i for i, g in enumerate(mine) if owner(g) == r], dtype=torch.long,
                            device=x.device) for r in range(world) if r != me}
    return _FetchRows.apply(x, send, recv)


def pad_across_ranks(ids, mask, pad_id):
    """(B, L) token ids and mask, each rank padded to its longest text -> padded to the longest over
    the ranks: a batch whose ids are all-gathered (ITM negatives) needs one length everywhere."""
    if not _active():
        return ids, mask
    L = torch.tensor([ids.shape[1]], device=ids.device)
    tdist.all_reduce(L, op=tdist.ReduceOp.MAX)
    pad = int(L) - ids.shape[1]
    return (torch.nn.functional.pad(ids, (0, pad), value=pad_id),
            torch.nn.functional.pad(mask, (0, pad)))


def all_reduce_mean(x):
    """Average a tensor (e.g. a logged loss) over ranks; returns a new, detached tensor on one process too."""
    x = x.detach().clone()
    if not _active():
        return x
    tdist.all_reduce(x)
    return x / tdist.get_world_size()


def all_gather_object(obj):
    """Gather any picklable object from every rank -> list in rank order (used to merge eval shards)."""
    if not _active():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src=0):
    if not _active():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def same_on_every_rank(value, what):
    """`value` (picklable), checked to be what every rank holds: e.g. the best.pt a final test reads,
    which a rank that does not share --out_dir with rank 0 would silently replace by its last weights
    while the test is sharded over the ranks.  Raises on every rank, naming what differs."""
    seen = all_gather_object(value)
    if any(v != seen[0] for v in seen):
        raise RuntimeError(f"{what} differs between ranks ({', '.join(map(repr, seen))}): every rank "
                           "must read the same --out_dir (a shared filesystem, as LAVIS and BLIP assume)")
    return value


def barrier():
    if _active():
        tdist.barrier()


def shard_indices(n, dist):
    """This rank's evaluation slice of range(n): contiguous, in rank order, together covering all n exactly
    once; ceil(n / world) rows each, the last ranks fewer or none (9 rows on 4 ranks: 3, 3, 3, 0)."""
    per = -(-n // dist.world_size)
    return list(range(dist.rank * per, min(n, (dist.rank + 1) * per)))


# newer torch splits `broadcast_buffers` in two and names the per-forward half `forward_sync_buffers`
_FORWARD_SYNC = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters


def wrap_ddp(module, dist, find_unused_parameters=False):
    """Wrap the *trainable* module in DDP when there are several processes; frozen parts stay out.

    Buffers are made rank 0's once, here, and not re-broadcast before every forward (DDP's
    default): the scripts' buffers are constants (transformers' position ids, BART's
    final_logits_bias) or dlip's feature queues, which every rank updates identically from
    all-gathered features, so the default would only ship the queues (118 MB at BLIP's 57,600
    entries) every step.  gradient_as_bucket_view: gradients live in DDP's all-reduce buckets,
    saving a gradient-sized copy and its memory (torch DDP documentation)."""
    if dist.world_size <= 1:
        return module
    if _FORWARD_SYNC:
        buffers = {"forward_sync_buffers": False}  # still syncs buffers at construction
    else:  # broadcast_buffers=False also skips the construction sync: do it here
        for b in module.buffers():
            tdist.broadcast(b, 0)
        buffers = {"broadcast_buffers": False}
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True,
                                   find_unused_parameters=find_unused_parameters, **buffers)


def unwrap(module):
    return module.module if isinstance(module, DistributedDataParallel) else module

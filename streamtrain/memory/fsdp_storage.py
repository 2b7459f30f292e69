"""What the tracker cannot see by itself under FSDP2: a gathered block's storage coming and going.

FSDP2 allocates a block's unsharded parameters once (torch.empty: the tracker sees that) and then
frees and re-allocates the same storages by resizing them (`storage.resize_(0)` after the block's
forward and backward, `resize_(n)` before the next all-gather). A resize is no aten op, so no
dispatch mode sees it: without help the tracker would count every block it ever gathered as live
(a whole unsharded model per rank). `follow_fsdp_storage(tracker)` wraps FSDP2's two methods that
resize them, so that after each the tracker re-reads the storages' sizes; the gathered block is
filed under `weights` (this rank's shards are there too).

The wrapped methods are private to torch.distributed.fsdp._fully_shard (FSDPParam); if a torch
release renames them this raises at once rather than planning silently wrong.
"""
from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

WRAPPED = ("alloc_all_gather_outputs", "free_unsharded_param")


def follow_fsdp_storage(tracker):
    """Make `tracker` follow FSDP2's resized storages until the returned function is called."""
    originals = {name: getattr(FSDPParam, name) for name in WRAPPED}

    def wrap(original):
        def method(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            for tensor in self.all_gather_outputs:
                tracker.resized(tensor, "weights")
            return result
        return method

    for name, original in originals.items():
        setattr(FSDPParam, name, wrap(original))

    def undo():
        for name, original in originals.items():
            setattr(FSDPParam, name, original)
    return undo

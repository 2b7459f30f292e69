import pytest
import torch

from streamtrain.models.llama import build_model
from streamtrain.models.presets import get_config

# Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine two threads
# waiting on each other make every step several times slower.
torch.set_num_threads(1)

TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, vocab_size=256,
            num_attention_heads=4, max_position_embeddings=128)


def tiny_config(**overrides):
    return get_config("llama-9m", **{**TINY, **overrides})


def tiny_model(seed=0, dtype=torch.float32, **overrides):
    return build_model(tiny_config(**overrides), seed=seed, dtype=dtype)


def random_batches(n, batch=2, seq=16, vocab=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (batch, seq), generator=gen),
             torch.randint(0, vocab, (batch, seq), generator=gen)) for _ in range(n)]


def spawn_cases(workers, out, world: int) -> dict:
    """Every case of `workers.CASES` trained once by `world` spawned gloo ranks (each rank runs
    workers.rank_main and saves `<case>-rank<r>.pt` under `out`): {(case, rank): saved results}."""
    import torch.multiprocessing as mp
    mp.spawn(workers.rank_main, args=(world, str(out / "store"), str(out), list(workers.CASES)), nprocs=world,
             join=True)
    return {(case, rank): torch.load(out / f"{case}-rank{rank}.pt") for case in workers.CASES for rank in range(world)}


def kill_when_saved(run, saved, timeout_s: float = 120) -> None:
    """Wait until `saved` exists (or `run`, a torchrun started in the background, ends), then
    SIGKILL torchrun and its ranks, as a crash would."""
    import signal
    import time

    import psutil
    deadline = time.time() + timeout_s
    while not saved.exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.02)
    launched = psutil.Process(run.pid)
    processes = [launched, *launched.children(recursive=True)]  # torchrun and its ranks
    for process in processes:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=30)
    run.wait()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)

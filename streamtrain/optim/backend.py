"""Which implementation runs the Adam updates: one switch for every rule.

  reference  optim/adam.adam_direction, then rules/base.update_weight: torch.optim.AdamW's
             single-tensor ops one by one (about ten passes over memory per chunk).
  fused      PyTorch's fused AdamW kernel (optim/fused.py), one pass per chunk; 8-bit states are
             dequantized before it and quantized after it, op by op.
  compiled   as fused, and 8-bit states go through one torch.compile'd kernel that dequantizes,
             runs Adam and quantizes (optim/adam8bit.py). The default.

STREAMTRAIN_UPDATE_BACKEND=reference|fused|compiled picks one (benchmarks show them side by side,
tests compare them). When torch.compile does not work on this machine (no C++ compiler, an
unsupported platform) the first compile failure is logged once and `compiled` runs as `fused`.
`update_backend()` says which runs, for the Trainer to print.

"""
import logging
import os

BACKENDS = ("reference", "fused", "compiled")
ENV_VARIABLE = "STREAMTRAIN_UPDATE_BACKEND"
DEFAULT_BACKEND = "compiled"

log = logging.getLogger(__name__)
_compile_failure: str | None = None   # why torch.compile did not work, once it failed


class UpdateBackendError(ValueError):
    pass


def requested_backend() -> str:
    """The backend STREAMTRAIN_UPDATE_BACKEND asks for (read at every call, so tests can set it;
    a dictionary lookup: it runs in every hook)."""
    name = os.environ.get(ENV_VARIABLE) or DEFAULT_BACKEND
    if name in BACKENDS:
        return name
    name = name.strip().lower() or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise UpdateBackendError(f"{ENV_VARIABLE}={name!r} is not an update backend; "
                                 f"set it to one of {', '.join(BACKENDS)} or unset it")
    return name


def update_backend() -> str:
    """The backend that runs: the requested one, except `fused` after torch.compile failed."""
    name = requested_backend()
    return "fused" if name == "compiled" and _compile_failure is not None else name


def describe_backend() -> str:
    """One line for logs: the backend that runs, and why it is not the requested one."""
    name = update_backend()
    if name != requested_backend():
        return f"{name} (torch.compile failed: {_compile_failure})"
    return name


def record_compile_failure(error: BaseException) -> None:
    """Switch `compiled` to `fused` for the rest of the process, and say so once."""
    global _compile_failure
    if _compile_failure is None:
        first_line = (str(error).strip().splitlines() or [""])[0]
        _compile_failure = f"{type(error).__name__}: {first_line}"
        log.warning("torch.compile failed (%s); 8-bit updates run the eager fused path", _compile_failure)

"""streamtrain: a per-layer, memory-streaming training runtime for PyTorch."""
from .engine import Engine, StepReport
from .methods import assign_rules
from .models.llama import Llama, build_model
from .models.presets import PRESETS, LlamaConfig, get_config
from .optim.schedule import ConstantSchedule, CosineSchedule

__all__ = ["Engine", "StepReport", "assign_rules", "Llama", "build_model", "PRESETS", "LlamaConfig",
           "get_config", "ConstantSchedule", "CosineSchedule"]
__version__ = "0.1.0"

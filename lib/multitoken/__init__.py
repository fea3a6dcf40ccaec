"""Multi-token prediction and MEDUSA-1 on pretrained causal LMs (GPT-2, Llama/SmolLM2).

Layers, each importing only those below it: ``utils`` < ``core`` (models: backbone adapters, heads, MTP, MEDUSA-1)
< ``decoding`` (the engine, trees, drafters) < ``compat`` (other systems' interfaces and the thesis' names) < the
workbook (data, training, evaluation, the stages the notebooks run)."""
from . import compat  # noqa: F401  (the other systems' names on the core's classes)
from .compat.interfaces import MTPTrainer, SpeculativeDecoder, get_mtp_weight
from .core.medusa import MedusaConfig, MedusaGPT2, MedusaLlama, MedusaLlamaConfig, wrap_model_with_medusa
from .core.models import MTPConfig, MTPLlamaConfig, MultiTokenGPT2, MultiTokenLlama, wrap_model_with_mtp
from .evaluation import PerformanceTracker

__all__ = ["MTPConfig", "MTPLlamaConfig", "MultiTokenGPT2", "MultiTokenLlama", "MedusaConfig", "MedusaLlamaConfig",
           "MedusaGPT2", "MedusaLlama", "wrap_model_with_mtp", "wrap_model_with_medusa", "MTPTrainer",
           "SpeculativeDecoder", "PerformanceTracker", "get_mtp_weight"]

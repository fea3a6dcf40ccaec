"""Multi-token prediction and MEDUSA-1 on pretrained causal LMs (GPT-2, Llama/SmolLM2): data, models, decoding,
evaluation. Every head design runs on every family through its backbone adapter (``multitoken.backbones``)."""
from transformers import AutoConfig, AutoModelForCausalLM

from .evaluation import PerformanceTracker
from .interfaces import MTPTrainer, SpeculativeDecoder, get_mtp_weight
from .medusa import MedusaConfig, MedusaGPT2, MedusaLlama, MedusaLlamaConfig, wrap_model_with_medusa
from .models import MTPConfig, MTPLlamaConfig, MultiTokenGPT2, MultiTokenLlama, wrap_model_with_mtp

# save_pretrained / from_pretrained / AutoModelForCausalLM work on our checkpoints
for _cfg, _cls in ((MTPConfig, MultiTokenGPT2), (MTPLlamaConfig, MultiTokenLlama), (MedusaConfig, MedusaGPT2),
                   (MedusaLlamaConfig, MedusaLlama)):
    AutoConfig.register(_cfg.model_type, _cfg, exist_ok=True)
    AutoModelForCausalLM.register(_cfg, _cls, exist_ok=True)

__all__ = ["MTPConfig", "MTPLlamaConfig", "MultiTokenGPT2", "MultiTokenLlama", "MedusaConfig", "MedusaLlamaConfig",
           "MedusaGPT2", "MedusaLlama", "wrap_model_with_mtp", "wrap_model_with_medusa", "MTPTrainer",
           "SpeculativeDecoder", "PerformanceTracker", "get_mtp_weight"]

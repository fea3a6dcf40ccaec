"""Multi-token prediction and MEDUSA-1 for GPT-2: data, models, decoding, evaluation."""
from transformers import AutoConfig, AutoModelForCausalLM

from .medusa import MedusaConfig, MedusaGPT2
from .models import MTPConfig, MultiTokenGPT2, wrap_model_with_mtp

# save_pretrained / from_pretrained / AutoModelForCausalLM work on our checkpoints
AutoConfig.register("multitoken_gpt2", MTPConfig, exist_ok=True)
AutoConfig.register("medusa_gpt2", MedusaConfig, exist_ok=True)
AutoModelForCausalLM.register(MTPConfig, MultiTokenGPT2, exist_ok=True)
AutoModelForCausalLM.register(MedusaConfig, MedusaGPT2, exist_ok=True)

__all__ = ["MTPConfig", "MultiTokenGPT2", "MedusaConfig", "MedusaGPT2", "wrap_model_with_mtp"]

"""The models: backbone adapters per family (``backbones``), kernels (``fastpath``), the heads (``heads``), MTP heads and
modules (``models``), MEDUSA-1 (``medusa``) and loading pretrained LMs (``pretrained``): config,
forward, loss, and what the decoding engine reads from a model. Imports nothing of the workbook but ``utils``."""
from transformers import AutoConfig, AutoModelForCausalLM

from .medusa import MedusaConfig, MedusaGPT2, MedusaLlama, MedusaLlamaConfig
from .models import MTPConfig, MTPLlamaConfig, MultiTokenGPT2, MultiTokenLlama

# save_pretrained / from_pretrained / AutoModelForCausalLM work on the workbook's checkpoints
for _cfg, _cls in ((MTPConfig, MultiTokenGPT2), (MTPLlamaConfig, MultiTokenLlama), (MedusaConfig, MedusaGPT2),
                   (MedusaLlamaConfig, MedusaLlama)):
    AutoConfig.register(_cfg.model_type, _cfg, exist_ok=True)
    AutoModelForCausalLM.register(_cfg, _cls, exist_ok=True)

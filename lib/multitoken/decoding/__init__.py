"""The decoding engine (``engine``: one step loop for a row and a batch, verification, acceptance, caches), candidate
trees (``trees``), drafters (``drafters``) and the MTP modules' drafting state (``modules``). Imports the core
(backbones, kernels), never the workbook."""
from .engine import (UNSUPPORTED, PlainLM, Sampling, SpecModel, StepStats, cache_bytes, check_generation_config,
                     greedy_generate, model_device, precompile, speculative_generate, sync, target_probs)
from .trees import Tree, parse_tree

__all__ = ["UNSUPPORTED", "PlainLM", "Sampling", "SpecModel", "StepStats", "Tree", "cache_bytes",
           "check_generation_config", "greedy_generate", "model_device", "parse_tree", "speculative_generate", "sync",
           "target_probs"]

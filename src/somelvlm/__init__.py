"""somelvlm: a standalone PyTorch InstructBLIP-Vicuna (SoMeLVLM) with LAVIS-exact numerics."""

from .config import LLMConfig, QFormerConfig, SoMeLVLMConfig, VisionConfig
from .model import SoMeLVLM
from .processing import SoMeLVLMProcessor

__version__ = "0.1.0"
__all__ = ["SoMeLVLM", "SoMeLVLMConfig", "SoMeLVLMProcessor", "VisionConfig", "QFormerConfig", "LLMConfig"]

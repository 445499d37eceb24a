"""Medical backbone pretraining: `python -m l2l_peft.pretrain CONFIG.yaml --output DIR` (see __main__)."""

from .config import PretrainConfig, load_config
from .loop import PretrainResult, pretrain

__all__ = ["PretrainConfig", "PretrainResult", "load_config", "pretrain"]

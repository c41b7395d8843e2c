"""prune_core: decoupled structured pruning of transformer attention (pure PyTorch + transformers + peft).

    from prune_core import prune, attention_sparsity, save_pruned, load_pruned
"""

from prune_core.accounting import attention_params, attention_sparsity, macs_per_sample, total_params
from prune_core.adapters import UnsupportedModelError, attention_sites
from prune_core.granularities import GRANULARITIES
from prune_core.io import load_pruned, save_pruned
from prune_core.latency_model import LatencyTableError, load_table, predicted_latency, predicted_speedup, save_table
from prune_core.models import build_ast, build_bert, build_vit, load_model
from prune_core.pruning import plan_pruning, prune
from prune_core.scorers import SCORERS, register
from prune_core.thresholds import THRESHOLDS

__all__ = [
    "GRANULARITIES",
    "LatencyTableError",
    "SCORERS",
    "THRESHOLDS",
    "UnsupportedModelError",
    "attention_params",
    "attention_sparsity",
    "attention_sites",
    "build_ast",
    "build_bert",
    "build_vit",
    "load_model",
    "load_pruned",
    "load_table",
    "macs_per_sample",
    "plan_pruning",
    "predicted_latency",
    "predicted_speedup",
    "prune",
    "register",
    "save_pruned",
    "save_table",
    "total_params",
]

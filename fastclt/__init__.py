"""fastclt: sparse dictionaries (SAEs, per-layer and cross-layer transcoders, Matryoshka variants,
MOLTs) at the speed limit of the GPU. See docs/DESIGN.md §10 for the public API."""
from fastclt.codes import SparseCodes
from fastclt.config import CLTConfig, MOLTConfig, SAEConfig
from fastclt.models import MOLT, CrossLayerTranscoder, LossOutput, SparseAutoencoder
from fastclt import ops
from fastclt.interop import load
from fastclt import export

__version__ = "0.1.0"

__all__ = ["SparseCodes", "CLTConfig", "SAEConfig", "MOLTConfig", "CrossLayerTranscoder", "SparseAutoencoder", "MOLT",
           "LossOutput",
           "ops", "load", "export", "__version__"]

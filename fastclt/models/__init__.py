from fastclt.models.base import LossOutput, SparseDictionary
from fastclt.models.clt import CrossLayerTranscoder
from fastclt.models.sae import SparseAutoencoder

__all__ = ["LossOutput", "SparseDictionary", "CrossLayerTranscoder", "SparseAutoencoder"]

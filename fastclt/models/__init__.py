from fastclt.models.base import LossOutput, SparseDictionary
from fastclt.models.clt import CrossLayerTranscoder
from fastclt.models.molt import MOLT
from fastclt.models.sae import SparseAutoencoder

__all__ = ["LossOutput", "SparseDictionary", "CrossLayerTranscoder", "SparseAutoencoder", "MOLT", "MODEL_KINDS",
           "MODEL_CLASSES"]

# The trainer's model kinds, and every model class by the name save_pretrained records (model_type).
MODEL_KINDS = {"clt": CrossLayerTranscoder, "sae": SparseAutoencoder, "molt": MOLT}
MODEL_CLASSES = {cls.__name__: cls for cls in MODEL_KINDS.values()}

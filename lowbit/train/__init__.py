"""Training-time compression: what runs in (or next to) the user's training loop. `controller.py`:
NNCF's `create_compressed_model` and its controller, from a config read by `config.py` (NNCF's JSON, validated
by `nncf_config.schema.json`, or NNI's config_list); `bn_adaptation.py`: BatchNorm statistics re-estimated
after compression; `accuracy_aware.py`: fine-tuning that stops once the compressed model is back within a
tolerated accuracy drop (early exit)."""

from .accuracy_aware import accuracy_aware_training
from .bn_adaptation import batch_norm_adaptation
from .controller import CompressionController, CompressionStage, create_compressed_model

__all__ = ["accuracy_aware_training", "batch_norm_adaptation", "create_compressed_model", "CompressionController",
           "CompressionStage"]

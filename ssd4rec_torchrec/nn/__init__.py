"""Pure-torch SSD4Rec modules on packed (jagged) sequences: SSD mixer, Bi-SSD layer, encoder
(and a CPU-fast `Dropout` they all use).

No TorchRec import here; the kernels come from `ssd4rec_torchrec.ops` (mamba-ssm only lazily, there).
"""

from ssd4rec_torchrec.nn.dropout import Dropout
from ssd4rec_torchrec.nn.encoder import BiSSDEncoder, EncoderConfig, init_official_
from ssd4rec_torchrec.nn.layers import BiSSDLayer, PositionwiseFeedForward
from ssd4rec_torchrec.nn.mixer import GatedRMSNorm, SSDMixer, gated_rms_norm

__all__ = [
    "BiSSDEncoder",
    "BiSSDLayer",
    "Dropout",
    "EncoderConfig",
    "GatedRMSNorm",
    "PositionwiseFeedForward",
    "SSDMixer",
    "gated_rms_norm",
    "init_official_",
]

# Transformer baselines with the same packed call signature (SASRec causal, BERT4Rec bidirectional).
from ssd4rec_torchrec.nn.baselines import (
    BERT4RecEncoder,
    JaggedAttentionPlan,
    JaggedTransformerEncoder,
    SASRecEncoder,
    jagged_attention,
)

__all__ += ["BERT4RecEncoder", "JaggedAttentionPlan", "JaggedTransformerEncoder", "SASRecEncoder", "jagged_attention"]

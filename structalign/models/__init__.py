"""Face-alignment models: ResNet backbones, map-to-node necks, the L-GRN head and the FC baseline.

    from structalign.models import build_model
    model = build_model(ModelConfig(), WFLW98, 256)    # (structalign.engine.config_schema, structalign.landmarks)
    points, visibility_logits = model(images)         # Tensor[B, 98, 2] (px), Tensor[B, 98]
"""
from structalign.models.build import build_model
from structalign.models.fc import FCHead
from structalign.models.landmark_graphs import message_graph
from structalign.models.lgrn import GraphConv, LGRNHead, RelationLearner
from structalign.models.map_to_node import MapToNode, MultiScaleMapToNode
from structalign.models.regressor import LandmarkRegressor, standardize
from structalign.models.resnet import ResNet, from_old_backbone_keys, load_backbone_weights

__all__ = [
    "FCHead",
    "GraphConv",
    "LGRNHead",
    "LandmarkRegressor",
    "MapToNode",
    "MultiScaleMapToNode",
    "RelationLearner",
    "ResNet",
    "build_model",
    "from_old_backbone_keys",
    "load_backbone_weights",
    "message_graph",
    "standardize",
]

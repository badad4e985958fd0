"""Models for tests: a tiny configuration (TINY) and make_model, structalign.models.build_model from keyword values."""
from structalign.engine.config_schema import ModelConfig
from structalign.landmarks import resolve_scheme
from structalign.models import build_model, load_backbone_weights

TINY = dict(backbone="resnet18", image_size=64, head_width=16, num_blocks=1, backbone_width=8, op_backend="reference")


def make_model(scheme="wflw98", image_size: int = 256, *, mean_shape=None, fused_layers: bool = True, **fields):
    """build_model(ModelConfig(**fields), the scheme (a LandmarkScheme or what resolve_scheme takes), image_size),
    with fields.backbone_weights loaded as a new run loads them."""
    model_cfg = ModelConfig(**fields)
    model = build_model(model_cfg, resolve_scheme(scheme), image_size, mean_shape=mean_shape, fused_layers=fused_layers)
    if model_cfg.backbone_weights is not None:
        load_backbone_weights(model.backbone, model_cfg.backbone_weights)
    return model

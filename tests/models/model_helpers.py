"""A tiny model configuration shared by the model tests (build_model keywords)."""
TINY = dict(backbone="resnet18", image_size=64, head_width=16, num_blocks=1, backbone_width=8, op_backend="reference")

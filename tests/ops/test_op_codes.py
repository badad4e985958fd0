"""The relative-location loss's criterion and reduction codes: one source (structalign.ops.reference CRITERIA and
REDUCTIONS, a name's index is its code), and the copies the C++ header and the Triton kernels need agree with it."""
import os
import re

from structalign.ops import reference
from structalign_kernels import relative_location_loss as triton_rll

HEADER = os.path.join(os.path.dirname(__file__), "..", "..", "csrc", "relative_location_loss_math.h")


def _codes(names) -> dict:
    return {name: code for code, name in enumerate(names)}


def _header_enum(name: str) -> dict:
    """{snake_case name: value} of `enum NAME : int64_t { kSoftWing = 0, ... }` in the header."""
    with open(HEADER) as f:
        body = re.search(rf"enum {name} : int64_t \{{([^}}]*)\}}", f.read())[1]
    members = re.findall(r"k(\w+)\s*=\s*(\d+)", body)
    return {re.sub(r"(?<!^)(?=[A-Z])", "_", member).lower(): int(value) for member, value in members}


def test_the_cpp_header_has_the_reference_codes():
    assert _header_enum("Criterion") == _codes(reference.CRITERIA)
    assert _header_enum("Reduction") == _codes(reference.REDUCTIONS)


def test_the_triton_kernels_have_the_reference_codes():
    assert triton_rll.CRITERIA == _codes(reference.CRITERIA)
    assert triton_rll.REDUCTIONS == _codes(reference.REDUCTIONS)

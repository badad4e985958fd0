"""Triton kernels of structalign, installed as `structalign_kernels` (one op a module).

Each module holds the @triton.jit kernels, plain launchers, and AOT_SPECS for the ahead-of-time compile test.
Only structalign.ops imports these; they never import structalign.models.
"""

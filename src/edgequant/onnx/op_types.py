"""ONNX op types by what they do to values, as the sim and the export need to know."""

DATA_MOVEMENT_OPS = frozenset({
    "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Expand", "Slice", "Split", "Tile",
    "DepthToSpace", "SpaceToDepth",
})
"""ONNX ops whose outputs hold values of their first input, so they share its encoding."""

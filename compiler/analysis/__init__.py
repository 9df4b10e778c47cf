"""Read-only analyses over a GraphModule: tracing, shapes, FLOPs, cut points."""

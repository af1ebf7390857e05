"""Public ops. Every op: backend="auto" | "reference" | "triton" | "cpp" | "cuda"."""

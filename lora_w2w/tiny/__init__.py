"""The tiny world: a CPU-sized miniature of the w2w setting (synthetic identities, a tiny
Stable-Diffusion-architecture pipeline, a tiny space and an evaluator)."""

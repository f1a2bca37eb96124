"""vit22b: ViT-22B and Swin Transformer V2 in JAX/Flax."""

"""PyTorch training engine: VAE, U-Net, latent-diffusion training and sampling (CPU/CUDA, DDP)."""

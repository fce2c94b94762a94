"""xdtrain: distributed parameter-server training for cross-domain and pre-trained recommendation."""
__version__ = "0.1.0"

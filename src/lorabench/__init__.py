"""lorabench: the synthetic experiments of 'The Expressive Power of Low-Rank Adaptation'."""

__version__ = "0.1.0"

"""harmonize: generative harmonization of multi-site medical images."""

__version__ = "0.1.0"

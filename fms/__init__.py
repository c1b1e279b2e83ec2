"""ibm-fms: Foundation Model Stack with paged attention on FlexAttention."""

__version__ = "0.1.0"

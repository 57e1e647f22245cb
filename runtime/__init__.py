"""corella's lean serving core.

Imports numpy and the serving libraries only: never torch, transformers or peft. What training and
serving must agree on (feature encoding, the prompt, the Yes/No readout, the entropy router) is
defined here once and imported by training.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]

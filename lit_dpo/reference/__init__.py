"""Reference strategies (`strategies`) and the on-disk cache of precomputed log-probs (`cache`)."""

from lit_dpo.reference.strategies import (
    REFERENCES,
    Reference,
    ReferenceSettings,
    make_reference,
    register,
)

__all__ = ["REFERENCES", "Reference", "ReferenceSettings", "make_reference", "register"]

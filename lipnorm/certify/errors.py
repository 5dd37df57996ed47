"""The error raised when part of a model has no sound Lipschitz bound."""

from __future__ import annotations

__all__ = ["NotCertifiableError"]


class NotCertifiableError(ValueError):
    """A layer (or the model) has no global Lipschitz bound that lipnorm can certify.

    The message names the layer, its type, why it cannot be bounded, and the way out:
    ``certify(model, ..., rules={"<layer name or type>": <bound>})`` supplies a bound the
    user vouches for.

    Parameters
    ----------
    layer : str
        The layer's name in the model.
    layer_type : str
        The layer's type (class or op name).
    reason : str
        Why no bound is available.
    """

    def __init__(self, layer: str, layer_type: str, reason: str):
        self.layer = layer
        self.layer_type = layer_type
        self.reason = reason
        super().__init__(
            f"layer {layer!r} ({layer_type}) {reason}; exclude it from the model, or pass "
            f"rules={{{layer!r}: <Lipschitz bound>}} (or rules={{{layer_type!r}: ...}} for "
            f"every {layer_type}) to certify() to supply a bound you vouch for"
        )

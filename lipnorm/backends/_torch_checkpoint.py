"""Reading checkpoints written with torch's spectral normalization into lipnorm's layout.

lipnorm keeps torch's *legacy* layout (``torch.nn.utils.spectral_norm``): parameter
``<name>_orig``, buffers ``<name>_u`` and ``<name>_v``, so legacy checkpoints load as they are.
torch's *parametrization* (``torch.nn.utils.parametrizations.spectral_norm``) writes
``parametrizations.<name>.original``, ``parametrizations.<name>.0._u`` and
``parametrizations.<name>.0._v``; ``migrate_keys_`` renames those.
"""

from __future__ import annotations

from collections.abc import MutableMapping


def lipnorm_keys(prefix: str, name: str) -> dict[str, str]:
    """Return ``{role: key}`` for the weight, ``u`` and ``v`` entries of lipnorm's layout."""
    return {"orig": f"{prefix}{name}_orig", "u": f"{prefix}{name}_u", "v": f"{prefix}{name}_v"}


def migrate_keys_(state_dict: MutableMapping, prefix: str, name: str) -> str:
    """Rename torch-parametrization keys of one normalized tensor to lipnorm's, in place.

    Parameters
    ----------
    state_dict : mutable mapping
        A (copied) state dict, as passed to ``Module._load_from_state_dict``.
    prefix : str
        The module's prefix in ``state_dict`` (``"block.0."``).
    name : str
        The normalized tensor's name (``"weight"``).

    Returns
    -------
    str
        ``"parametrization"`` when keys were renamed, else ``"lipnorm"`` (lipnorm's own or
        torch's legacy layout, which are the same).

    Example
    -------
    >>> sd = {"parametrizations.weight.original": 1, "parametrizations.weight.0._u": 2}
    >>> migrate_keys_(sd, "", "weight"), sorted(sd)
    ('parametrization', ['weight_orig', 'weight_u'])
    """
    ours = lipnorm_keys(prefix, name)
    theirs = {
        "orig": f"{prefix}parametrizations.{name}.original",
        "u": f"{prefix}parametrizations.{name}.0._u",
        "v": f"{prefix}parametrizations.{name}.0._v",
    }
    source = "lipnorm"
    for role, key in theirs.items():
        if key in state_dict and ours[role] not in state_dict:
            state_dict[ours[role]] = state_dict.pop(key)
            source = "parametrization"
    return source

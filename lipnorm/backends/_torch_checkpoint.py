"""Reading checkpoints written with torch's spectral normalization into lipnorm's layout.

lipnorm keeps torch's *legacy* layout (``torch.nn.utils.spectral_norm``): parameter
``<name>_orig``, buffers ``<name>_u`` and ``<name>_v``, so legacy checkpoints load as they are.
torch's *parametrization* (``torch.nn.utils.parametrizations.spectral_norm``) writes
``parametrizations.<name>.original``, ``parametrizations.<name>.0._u`` and
``parametrizations.<name>.0._v``; ``migrate_keys_`` renames those. torch's legacy spectral
norm before its version 1 wrote ``<name>`` (the normalized weight) instead of ``<name>_v``;
``restore_legacy_v_`` recomputes ``v`` from it, as torch's own load hook does.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch


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


def restore_legacy_v_(state_dict: MutableMapping, prefix: str, name: str, view) -> bool:
    """Replace the normalized weight of a pre-1.0 legacy checkpoint by the ``v`` it implies, in place.

    Before version 1, torch's legacy ``spectral_norm`` saved ``<name>_orig``, ``<name>_u`` and
    ``<name>`` (``W / sigma``) but no ``<name>_v``. As torch's load hook does, ``sigma`` is
    recovered from the two weights and ``v`` solves ``W v = u`` in the least-squares sense,
    rescaled so that ``<u, W v> = sigma``; eval then reproduces the saved normalized weight.

    Parameters
    ----------
    state_dict : mutable mapping
        A (copied) state dict, as passed to ``Module._load_from_state_dict``.
    prefix : str
        The module's prefix in ``state_dict``.
    name : str
        The normalized tensor's name.
    view : MatrixView
        The matrix view the legacy ``u`` belongs to (torch's ``dim``).

    Returns
    -------
    bool
        True when the checkpoint had the pre-1.0 layout and was converted.
    """
    keys = lipnorm_keys(prefix, name)
    normalized_key = prefix + name
    if keys["v"] in state_dict or not all(k in state_dict for k in (keys["orig"], keys["u"], normalized_key)):
        return False
    normalized = state_dict.pop(normalized_key)
    with torch.no_grad():
        weight = state_dict[keys["orig"]]
        u = state_dict[keys["u"]]
        # Least-squares ratio W = sigma * W_n (robust to zero entries, unlike a mean of ratios).
        sigma = torch.vdot(normalized.reshape(-1), weight.reshape(-1)) / torch.vdot(
            normalized.reshape(-1), normalized.reshape(-1))
        matrix = view.operand(weight)
        v = torch.linalg.pinv(matrix) @ u
        state_dict[keys["v"]] = v * (sigma / torch.vdot(u, matrix @ v))
    return True

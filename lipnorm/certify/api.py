"""``certify``: a model of any supported format → :class:`Certificate`."""

from __future__ import annotations

from lipnorm.certify.certificate import Certificate
from lipnorm.certify.formats import model_format
from lipnorm.certify.ladder import certify_graph
from lipnorm.certify.lower import lipschitz_lower_bound

__all__ = ["certify"]


def certify(model, input_shape=None, *, method: str = "auto", time_budget: float = 10.0,
            rules=None, lower=None, seed: int = 0, progress=None, rows=None) -> Certificate:
    """Certified upper bound of a network's L2 Lipschitz constant, layer by layer.

    The model is translated into a graph of layers; every linear layer gets a certified
    norm (adjacent linear layers — a BatchNorm after a convolution, two dense layers —
    are merged first), every nonlinearity its Lipschitz constant and, for elementwise
    activations, its slope range. The ``product`` method composes the bounds along the
    graph (products along paths, sums at residual additions, √ΣL² at concatenations);
    ``chain`` and ``sdp`` are tighter, and every bound they report is checked exactly in
    float64 (see :mod:`lipnorm.certify.methods`).

    Parameters
    ----------
    model : torch.nn.Module, keras.Model, onnx.ModelProto or path to a .onnx file
        The network, in inference mode (torch: ``model.eval()``).
    input_shape : tuple of int, optional
        Shape of one input without the batch axis (channels first for torch and ONNX, as
        the model expects). Needed by torch; Keras and ONNX take it from the model when
        it is fixed there.
    method : {"auto", "product", "chain", "conv_sdp", "sdp"}
        ``"auto"`` (default): the tightest certified bound of the ladder within
        ``time_budget``, never looser than ``"product"``. ``"chain"``, ``"conv_sdp"``
        (convolutional networks at any image size) and ``"sdp"`` climb the ladder up to
        that method and report the tightest bound on the way;
        where a method does not apply (a layer it cannot hold, multipliers that fail
        the exact check) ``Certificate.ladder`` says why and the bound below it stands.
        ``"sdp"`` on a network too large for the budget raises ``ValueError`` naming
        the size and the budget.
    time_budget : float
        Seconds the tighter methods may use, counted from the start and split between
        them before they run (the product bound is always computed in full; see
        docs/certify.md, "The time budget").
    rules : dict, optional
        Bounds for layers lipnorm cannot bound: ``{layer name or type name: bound}``
        where bound is a float, a callable ``layer -> float``, or ``"epsilon"`` to accept
        max|γ|/√ε for LayerNorm/GroupNorm.
    lower : array or True, optional
        Also run :func:`lipschitz_lower_bound` from these inputs (``True``: 64 Gaussian
        inputs of ``input_shape``), for at most ``time_budget`` seconds, and store its
        value as ``Certificate.lower``.
    seed : int
        Seed of the lower-bound search.
    progress : callable, optional
        Called as ``progress(done, total, layer_name)`` while layers are bounded.
    rows : array_like, shape (p, number of outputs), optional
        Also bound the Lipschitz constant of each functional ``x ↦ rows[i] · f(x)``
        (for a classifier, logit differences: rows ``e_y − e_j``), stored in
        ``Certificate.row_upper``; ``upper`` is then the largest of them.

    Returns
    -------
    Certificate
        ``upper`` is a sound upper bound of the Lipschitz constant of the model on
        inputs of that shape.

    Raises
    ------
    NotCertifiableError
        Names a layer without a sound bound and the ``rules={...}`` way out.

    Example
    -------
    >>> import torch, lipnorm                                        # doctest: +SKIP
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()).eval()
    >>> lipnorm.certify(net, (4,)).upper                              # doctest: +SKIP
    """
    kind = model_format(model)
    if kind == "torch":
        from lipnorm.certify import torch_frontend as frontend
    elif kind == "keras":
        from lipnorm.certify import keras_frontend as frontend
    else:
        from lipnorm.certify import onnx_frontend as frontend
    if kind == "torch" and input_shape is None:
        raise ValueError("certify() needs input_shape for a torch model, e.g. input_shape=(3, 224, 224)")
    builder, shape = frontend.build_graph(model, input_shape, rules)
    if shape is not None:
        builder.graph.record_shape(builder.graph.input_name, (1, *shape))
    name = getattr(model, "name", None) if kind == "keras" else None
    certificate = certify_graph(builder.graph, model_name=name or type(model).__name__,
                                input_shape=shape, skipped=builder.skipped, progress=progress,
                                method=method, time_budget=time_budget, rows=rows)
    if lower is not None and lower is not False:
        result = lipschitz_lower_bound(model, lower if lower is not True else None,
                                       input_shape=shape, seed=seed, time_budget=time_budget)
        certificate = certificate.with_lower(result.value)
    return certificate

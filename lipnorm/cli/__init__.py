"""The ``lipnorm`` command.

``lipnorm sigma PATH [--key NAME] [--method METHOD] [--rtol RTOL] [--no-bounds] [--json]
[--include-non-float] [--input-size H,W[,D] [--stride S] [--padding P] [--dilation D] [--groups G]]``
    σ_max, its certified interval, the method and the time for the tensors of a weight file
    (``.npy``, ``.npz``, ``.pt``/``.pth``, ``.safetensors``), a sharded checkpoint's
    ``*.safetensors.index.json`` or a directory of shards, read one tensor at a time (see
    :mod:`lipnorm.weights_io`: low-precision floats widened exactly, float8/int8 weights with
    scales dequantized, packed integer quantizations skipped and counted). Without ``--key``
    every floating-point tensor of 2 to 5 axes gets a row; a tensor of 3 to 5 axes is
    measured as the matrix ``(shape[0], -1)`` (a conv kernel's reshaped form), and with
    ``--input-size`` also as the convolution operator on inputs of that size (certified, see
    :func:`lipnorm.conv_operator`). Non-float tensors (integer buffers) are skipped unless
    ``--include-non-float``. ``--json`` adds the Frobenius norm and the stable rank.
``lipnorm certify MODEL [--input-shape C,H,W] [--lower] [--json OUT] [--plot OUT]``
    A certified upper bound on a network's Lipschitz constant (``.onnx``, ``.keras``,
    ``.pt2``), layer by layer; see :mod:`lipnorm.certify.cli`.
``lipnorm robustness MODEL --data SAMPLES.npz [--eps 0.1,0.25,0.5] [--attack] [--json] [--plot]``
    Certified and empirical accuracy at L2 radii; see :mod:`lipnorm.robustness.cli`.
``lipnorm demo``
    The demonstration: estimates and certified bounds next to the SVD.

Exit codes of ``sigma``: 0 on success, 1 if some tensor could not be measured (its row says
why), 2 for a bad command line or a file that cannot be read. ``certify``: 0 certified, 1 the
model file could not be loaded, 2 a layer cannot be certified.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import lipnorm
from lipnorm.certify.cli import add_arguments as add_certify_arguments
from lipnorm.certify.cli import run_certify
from lipnorm.cli import console
from lipnorm.cli.console import EXIT_OK, EXIT_USAGE, CommandError
from lipnorm.cli.sigma import add_arguments as add_sigma_arguments
from lipnorm.cli.sigma import run_sigma
from lipnorm.robustness.cli import add_arguments as add_robustness_arguments
from lipnorm.robustness.cli import run_robustness
from lipnorm.weights_io import INDEX_SUFFIX, SUFFIXES

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lipnorm`` command line; return its exit code.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when omitted.

    Returns
    -------
    int
        0 on success, 1 if a tensor could not be measured, 2 for a bad command line or file.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CommandError as exc:
        print(f"lipnorm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


#: The commands with arguments of their own: name, help, description, arguments, runner.
_COMMANDS = (
    ("sigma",
     "sigma_max and its certified interval for the tensors of a weight file or checkpoint",
     "Print sigma_max (the largest singular value), a certified interval "
     "lower <= sigma_max <= upper, the method and the time for tensors of a weight "
     f"file ({', '.join(SUFFIXES)}), a sharded checkpoint's *{INDEX_SUFFIX} or a "
     "directory of shards. Files are read as data: nothing in them is run. Tensors "
     "are read one at a time; bfloat16, float16 and float8 are widened to float32 "
     "(exact), and float8/int8 weights with a scale tensor are dequantized.",
     add_sigma_arguments, run_sigma),
    ("certify",
     "certified upper bound on a network's Lipschitz constant",
     "Certify an upper bound on the Lipschitz constant (l2) of a model file, layer by "
     "layer. Pickled torch models are refused unless --trust-pickle is given.",
     add_certify_arguments, run_certify),
    ("robustness",
     "certified L2 radii and accuracy of a classifier on labelled samples",
     "Certified accuracy at L2 radii eps of a classifier file on the samples of an .npz "
     "file (x, y; read without pickle), with --attack the accuracy under an L2 attack.",
     add_robustness_arguments, run_robustness),
)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lipnorm", description="The spectral norm of neural-network weights."
    )
    parser.add_argument("--version", action="version", version=f"lipnorm {lipnorm.__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    for name, help_text, description, add_arguments, run in _COMMANDS:
        command = commands.add_parser(name, help=help_text, description=description)
        add_arguments(command)
        command.set_defaults(run=run)

    demo = commands.add_parser(
        "demo", help="estimates next to the SVD; train, normalize and certify a small CNN"
    )
    demo.add_argument(
        "--output-dir", metavar="DIR", default=".",
        help="existing directory for the demo's plot (default: the current directory)",
    )
    demo.set_defaults(run=_run_demo)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from lipnorm.demo import run_demo

    if not os.path.isdir(args.output_dir):
        raise CommandError(f"--output-dir {args.output_dir}: not a directory")
    terminal, _ = console.rich_table_console()
    run_demo(terminal, args.output_dir)
    return EXIT_OK

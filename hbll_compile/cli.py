"""The ``hbll`` command.

Example:
    hbll inspect examples/cifar10_resnet.py:build_model --input-shape 4,3,32,32 --blocks 4 --png tree.png
    hbll inspect mymodel.py:build --input-shape 2,64 --dtype int64
    hbll export examples/models.py:resnet --input-shape 4,3,32,32 --blocks 4 --depth 1 -o resnet_d1.onnx
    hbll diagnose examples/mnist_resmlp.py:build_model --input-shape 64,784 --blocks 8 --train-steps 20 --png cos.png

Errors: a bad argument or a model hbll-compile refuses ends the command with exit status 2 and a
one-line message on stderr (``hbll: CaptureError: at input 0: ...``, then the remedy line); the
traceback is printed only with ``--debug``. Any other failure is a bug: exit status 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch
from torch import nn

from hbll_compile._util import random_inputs
from hbll_compile.api import hbll_compile
from hbll_compile.errors import CompileError
from hbll_compile.export import export_onnx
from hbll_compile.model import HBLLModel

__all__ = ["UsageError", "build_parser", "draw_tree", "example_inputs", "load_factory", "main"]

INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
                torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
"""The dtypes ``--dtype`` accepts: those :func:`example_inputs` can fill with random values."""
DEBUG_HELP = "print the traceback of an error, not only its one-line message"


class UsageError(Exception):
    """A command-line argument argparse (or a check of ours) refused."""


class _Parser(argparse.ArgumentParser):
    """An argument parser that raises :class:`UsageError` instead of printing usage and exiting, so
    :func:`main` reports every bad argument as one line with exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """Resolve ``FILE.py:FACTORY`` to the callable ``FACTORY`` defined in ``FILE.py``.

    Raises :class:`CompileError` (``node`` is the spec) for a malformed spec, a missing file, a file
    that fails to import, or a name that is not a callable in it.
    """
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name.isidentifier():
        raise CompileError(f"expected FILE.py:FACTORY, got {spec!r}", node="FACTORY",
                           remedy="name a Python file and a function in it, e.g. examples/models.py:resnet")
    file = Path(path)
    if not file.is_file():
        raise CompileError(f"no such file: {file}", node=spec, remedy="check the path to the .py file")
    module_spec = importlib.util.spec_from_file_location(file.stem, file)
    if module_spec is None or module_spec.loader is None:
        raise CompileError(f"{file} cannot be imported as a Python module", node=spec,
                           remedy="name a .py source file")
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(file.parent.resolve()))
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - any failure of the user's file is reported against it
        raise CompileError(f"importing {file} failed: {type(err).__name__}: {err}", node=spec,
                           remedy="fix the error in that file (run with --debug for the traceback)") from err
    finally:
        sys.path.pop(0)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise CompileError(f"{file} defines no callable {name!r}", node=spec,
                           remedy=f"define `def {name}() -> nn.Module` in {file}, or name another function")
    return factory


def build_model(spec: str) -> nn.Module:
    """Call the factory ``spec`` names (see :func:`load_factory`); its failure is a :class:`CompileError`."""
    factory = load_factory(spec)
    try:
        return factory()
    except Exception as err:  # noqa: BLE001 - the user's factory failing is reported against it
        raise CompileError(f"{spec}() raised {type(err).__name__}: {err}", node=spec,
                           remedy="fix the factory (run with --debug for the traceback)") from err


def input_shape(text: str) -> tuple[int, ...]:
    """Parse ``--input-shape``: comma-separated sizes, batch first (``4,1,28,28``).

    >>> input_shape("4,1,28,28")
    (4, 1, 28, 28)
    >>> input_shape("4x8")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected comma-separated sizes like 4,1,28,28, got '4x8'
    """
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(s < 0 for s in shape):
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 4,1,28,28, got {text!r}")
    return shape


def input_dtype(text: str) -> torch.dtype:
    """Parse ``--dtype``: a torch dtype name from :data:`INPUT_DTYPES` (``float32``, ``int64``, ...)."""
    dtype = getattr(torch, text, None) if text.isidentifier() else None
    if dtype not in INPUT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in INPUT_DTYPES)
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose one of {names}")
    return dtype


def example_inputs(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[torch.dtype]) -> tuple[torch.Tensor, ...]:
    """Random inputs of ``shapes`` (repeatable, one per model input): normal samples for float and
    complex dtypes, 0/1 for the others. ``dtypes[i]`` is input i's dtype; the last one repeats."""
    specs = [(shape, str(dtypes[min(i, len(dtypes) - 1)]).removeprefix("torch.")) for i, shape in enumerate(shapes)]
    return random_inputs(specs)


def draw_tree(m: HBLLModel, path: str) -> None:
    """Draw the block tree with matplotlib: internal nodes are couplers, leaves are blocks."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit("error: --png needs matplotlib: pip install 'hbll-compile[plot]'") from err
    tree = m.tree
    fig, ax = plt.subplots(figsize=(max(6, tree.n_blocks * 0.9), 1.4 * (tree.depth + 1)))
    centre = {n.id: (n.span[0] + n.span[1]) / 2 for n in tree}
    for n in tree:
        x, y = centre[n.id], -n.depth
        for c in n.children:
            ax.plot([x, centre[c]], [y, -tree.nodes[c].depth], color="0.6", zorder=1)
        label = f"block {n.span[1]}" if n.is_leaf else f"C({n.span[0]},{n.span[1]}]"
        ax.text(x, y, label, ha="center", va="center", zorder=2, fontsize=8,
                bbox={"boxstyle": "round", "fc": "#cfe8ff" if n.is_leaf else "#ffe2b8", "ec": "0.4"})
    ax.set_xlim(0, tree.n_blocks)
    ax.set_ylim(-tree.depth - 0.6, 0.6)
    ax.axis("off")
    ax.set_title(f"HBLL tree: N={tree.n_blocks}, depth {tree.depth}")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _inspect(args: argparse.Namespace) -> int:
    model = build_model(args.factory)
    m = hbll_compile(model, example_inputs(args.input_shape, args.dtype), blocks=args.blocks, over=args.over)
    print(m.describe())
    print(f"capture: {m.report.capture}; legal cuts: {m.report.legal_cuts} "
          f"(at most {m.report.max_blocks} blocks); context values: {len(m.context_names)}")
    print(f"training step ({m.schedule.name}): critical path {m.schedule.critical_path()} module evaluations "
          f"(BP: {2 * len(m.blocks)})")
    if args.png:
        draw_tree(m, args.png)
        print(f"tree drawn to {args.png}")
    return 0


def _export(args: argparse.Namespace) -> int:
    model = build_model(args.factory)
    inputs = example_inputs(args.input_shape, args.dtype)
    m = hbll_compile(model, inputs, blocks=args.blocks, over=args.over)
    report = export_onnx(m, args.output, depth=args.depth, dynamic_batch=not args.static_batch,
                         verify=not args.no_verify, example_inputs=inputs, opset=args.opset, exporter=args.exporter)
    what = "exact chain" if report.depth is None else f"depth-{report.depth} subnetwork"
    check = ("not checked" if report.max_abs_diff is None else
             f"onnxruntime matches torch: max abs diff {report.max_abs_diff:.2e} on batches "
             f"{', '.join(map(str, report.checked_batches))}")
    print(f"wrote {report.path}: {what} of {len(m.blocks)} blocks, {report.exporter} exporter, opset {report.opset}; "
          f"{check}")
    if report.fallback_reason:
        print(f"note: {report.fallback_reason}")
    return 0


def _cross_entropy_last_dim(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the classes on the last dim (logits (B, C) or (B, T, V))."""
    return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


_DIAGNOSE_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": _cross_entropy_last_dim,
    "mse": torch.nn.functional.mse_loss,
}


def _diagnose(args: argparse.Namespace) -> int:
    """Compile, optionally train a few steps on the example batch, print the gradient report."""
    from hbll_compile.config import HBLLConfig
    from hbll_compile.runtime.fidelity import plot_report

    torch.manual_seed(args.seed)  # the factory's initialisation: the same report on every run
    model = load_factory(args.factory)()
    inputs = example_inputs(args.input_shape, args.dtype)
    heads = {} if args.head_weight is None else {"local_head_weight": args.head_weight}
    config = HBLLConfig(inputs=args.inputs, seed=args.seed, **heads)
    m = hbll_compile(model, inputs, blocks=args.blocks, loss=_DIAGNOSE_LOSSES[args.loss], config=config,
                     over=args.over)
    # a seeded synthetic target shaped like the output: class ids over its last dim, or values for mse
    shape = (inputs[0].shape[0], *m.boundaries[-1].shape)
    generator = torch.Generator().manual_seed(args.seed + 1)
    if args.loss == "cross_entropy":
        target = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    else:
        target = torch.randn(shape, generator=generator)
    if args.train_steps:
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3)
        for _ in range(args.train_steps):
            optimizer.zero_grad(set_to_none=True)
            m.training_step(*inputs, target=target)
            optimizer.step()
    report = m.gradient_report(*inputs, target=target, paths=args.paths)
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
        print(f"report written to {args.json}")
    if args.png:
        try:
            plot_report(report, args.png)
        except ImportError as err:
            raise SystemExit(f"error: --png needs matplotlib: {err}") from err
        print(f"per-block cosines drawn to {args.png}")
    return 0


def _compile_command(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand with the arguments every compiling command takes: factory, inputs, blocks, over."""
    command = sub.add_parser(name, help=help)
    command.add_argument("factory", help="FILE.py:FACTORY, a function returning the nn.Module")
    command.add_argument("--input-shape", action="append", required=True, type=input_shape,
                         help="comma-separated example input shape, batch first (at least 2 rows); "
                         "repeat for each model input")
    command.add_argument("--dtype", action="append", default=None, type=input_dtype,
                         help="dtype of each input (default float32; int64 for token ids)")
    command.add_argument("--blocks", type=int, default=None, help="number of blocks N (default: automatic)")
    command.add_argument("--over", choices=("depth", "time"), default="depth",
                         help="cut the layers (default) or a recurrent model's time steps into chunks")
    command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hbll", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = _compile_command(sub, "inspect", "compile a model and print its blocks and tree")
    inspect.add_argument("--png", default=None, help="draw the tree to this PNG file (needs matplotlib)")
    inspect.set_defaults(run=_inspect)
    export = _compile_command(sub, "export", "compile a model and write its ONNX graph (exact chain or a depth)")
    export.add_argument("--depth", type=int, default=None,
                        help="export the depth-d subnetwork (default: the exact chain)")
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    export.add_argument("--exporter", choices=("auto", "dynamo", "legacy"), default="auto",
                        help="torch.onnx exporter: dynamo, legacy TorchScript, or dynamo then legacy (default)")
    export.add_argument("--static-batch", action="store_true", help="fix the batch size to the example's")
    export.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    export.set_defaults(run=_export)
    diagnose = _compile_command(sub, "diagnose", "compile a model and print its gradient-fidelity report")
    diagnose.add_argument("--loss", choices=tuple(_DIAGNOSE_LOSSES), default="cross_entropy",
                          help="task loss; the target is synthetic and seeded (class ids over the output's "
                               "last dim for cross_entropy)")
    diagnose.add_argument("--train-steps", type=int, default=0,
                          help="HBLL training steps (AdamW, lr 1e-3) on the example batch before measuring")
    diagnose.add_argument("--paths", choices=("couplers", "exact"), default="couplers",
                          help="paths through the learned couplers, or the exact blocks (self-check: cosine 1 "
                               "with --head-weight 0)")
    diagnose.add_argument("--head-weight", type=float, default=None,
                          help="HBLLConfig.local_head_weight (default: the library's; local heads add their own "
                               "term to every block's gradient)")
    diagnose.add_argument("--inputs", choices=("wavefront", "tree"), default="wavefront",
                          help="HBLLConfig.inputs: where block inputs come from")
    diagnose.add_argument("--seed", type=int, default=0, help="seeds the model's initialisation and the target")
    diagnose.add_argument("--json", default=None, help="also write the report to this JSON file")
    diagnose.add_argument("--png", default=None, help="plot the per-block cosines to this PNG file (needs matplotlib)")
    diagnose.set_defaults(run=_diagnose)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit status: 0, 2 for a bad argument or a refused model (one line
    on stderr, the traceback only with ``--debug``), 1 for an unexpected failure (a bug)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # known even when parsing fails
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "dtype", None) is None:
            args.dtype = [torch.float32]
        return args.run(args)
    except UsageError as err:
        print(f"hbll: error: {err}", file=sys.stderr)
        return 2
    except CompileError as err:
        _report(err, debug)
        if err.remedy:
            print(f"  remedy: {err.remedy.splitlines()[0]}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a bug: one line, the traceback with --debug
        _report(err, debug)
        print("  this is a bug in hbll-compile: please report it with the output of --debug", file=sys.stderr)
        return 1


def _report(err: Exception, debug: bool) -> None:
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    text = str(err).strip() or type(err).__name__
    print(f"hbll: {type(err).__name__}: {text.splitlines()[0]}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())

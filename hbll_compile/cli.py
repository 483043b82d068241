"""The ``hbll`` command.

Example:
    hbll inspect examples/cifar10_resnet.py:build_model --input-shape 4,3,32,32 --blocks 4 --png tree.png
    hbll inspect mymodel.py:build --input-shape 2,64 --dtype int64
    hbll export examples/models.py:resnet --input-shape 4,3,32,32 --blocks 4 --depth 1 -o resnet_d1.onnx
    hbll diagnose examples/mnist_resmlp.py:build_model --input-shape 64,784 --blocks 8 --train-steps 20 --png cos.png
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from hbll_compile.api import hbll_compile
from hbll_compile.errors import CompileError
from hbll_compile.export import export_onnx
from hbll_compile.model import HBLLModel


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """Resolve ``FILE.py:FACTORY`` to the callable ``FACTORY`` defined in ``FILE.py``."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py"):
        raise SystemExit(f"error: expected FILE.py:FACTORY, got {spec!r}")
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"error: no such file: {file}")
    module_spec = importlib.util.spec_from_file_location(file.stem, file)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(file.parent.resolve()))
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise SystemExit(f"error: {file} defines no callable {name!r}")
    return factory


def example_inputs(shapes: Sequence[str], dtypes: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """Random inputs for ``--input-shape 4,1,28,28`` (repeatable, one per model input)."""
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for i, text in enumerate(shapes):
        shape = tuple(int(s) for s in text.split(","))
        dtype = getattr(torch, dtypes[i] if i < len(dtypes) else dtypes[-1])
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator, dtype=dtype))
        else:
            inputs.append(torch.randint(0, 2, shape, generator=generator, dtype=dtype))
    return tuple(inputs)


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
    model = load_factory(args.factory)()
    m = hbll_compile(model, example_inputs(args.input_shape, args.dtype), blocks=args.blocks)
    print(m.describe())
    print(f"capture: {m.report['capture']}; legal cuts: {m.report['legal_cuts']} "
          f"(at most {m.report['max_blocks']} blocks); context values: {len(m.context_names)}")
    print(f"training step ({m.schedule.name}): critical path {m.schedule.critical_path()} module evaluations "
          f"(BP: {2 * len(m.blocks)})")
    if args.png:
        draw_tree(m, args.png)
        print(f"tree drawn to {args.png}")
    return 0


def _export(args: argparse.Namespace) -> int:
    model = load_factory(args.factory)()
    inputs = example_inputs(args.input_shape, args.dtype)
    m = hbll_compile(model, inputs, blocks=args.blocks)
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
    config = HBLLConfig(inputs=args.inputs, seed=args.seed)
    m = hbll_compile(model, inputs, blocks=args.blocks, loss=_DIAGNOSE_LOSSES[args.loss], config=config)
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
    """A subcommand with the arguments every compiling command takes: factory, inputs, blocks."""
    command = sub.add_parser(name, help=help)
    command.add_argument("factory", help="FILE.py:FACTORY, a function returning the nn.Module")
    command.add_argument("--input-shape", action="append", required=True,
                         help="comma-separated example input shape; repeat for each model input")
    command.add_argument("--dtype", action="append", default=None,
                         help="dtype of each input (default float32; int64 for token ids)")
    command.add_argument("--blocks", type=int, default=None, help="number of blocks N (default: automatic)")
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hbll", description=__doc__.splitlines()[0])
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
                          help="paths through the learned couplers, or the exact blocks (self-check: cosine 1)")
    diagnose.add_argument("--inputs", choices=("wavefront", "tree"), default="wavefront",
                          help="HBLLConfig.inputs: where block inputs come from")
    diagnose.add_argument("--seed", type=int, default=0, help="seeds the model's initialisation and the target")
    diagnose.add_argument("--json", default=None, help="also write the report to this JSON file")
    diagnose.add_argument("--png", default=None, help="plot the per-block cosines to this PNG file (needs matplotlib)")
    diagnose.set_defaults(run=_diagnose)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "dtype", None) is None:
        args.dtype = ["float32"]
    try:
        return args.run(args)
    except CompileError as err:
        print(f"hbll: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

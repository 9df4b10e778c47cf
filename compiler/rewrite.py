"""``python -m compiler.rewrite MODEL``: find cut points, insert exit heads, emit a scripted artifact."""
import argparse
import datetime
import json
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.fx as fx

from . import artifact
from .analysis.cutpoints import CutPoint, choose_exits, find_cut_points, score
from .analysis.flops import FlopCounter
from .analysis.trace import annotate, clean_exported, info, trace_module
from .attention import swap_attention, swap_window_attention
from .config import MAX_EXITS, ArgumentParser, RewriteConfig, check_shape, number
from .errors import CompilerError, NoCutPointError, ShapeError, UsageError, brief, run_cli
from .heads import ExitHead, HeadSpec, plan_heads
from .loading import LoadedModel, load_model
from .split import split_stages

ANALYSIS_BATCH = 2  # > 1 so the batch dimension can be told from other dimensions of size 1
DYNAMIC_BATCH_HINT = ("If the program was exported with a static batch size, export it with a "
                      "dynamic batch dimension (dynamic_shapes={'x': {0: torch.export.Dim('batch')}})")


@dataclass
class Analysis:
    """What the compiler learned about a model, before any rewriting."""

    gm: fx.GraphModule
    example: torch.Tensor
    output: torch.Tensor
    total_flops: int            # per row
    params: int
    cuts: List[CutPoint]
    unsupported: Counter


def analyse(model: torch.nn.Module, input_shape, config: RewriteConfig,
            exported: bool = False) -> Analysis:
    """Trace ``model``, annotate shapes and FLOPs, and list its scored cut points."""
    config.validate()
    if input_shape is None:
        raise ShapeError("no example input shape is known for this model; pass --input-shape "
                         "e.g. 1,3,224,224")
    check_shape(tuple(input_shape))
    check_leaf_modules(model, config.leaf_modules, exported)
    gm = clean_exported(model) if exported else trace_module(model.eval(), config.leaf_modules)
    gm.eval()
    g = torch.Generator().manual_seed(config.seed)
    example = torch.randn((ANALYSIS_BATCH,) + tuple(input_shape[1:]), generator=g)
    # The example has ANALYSIS_BATCH rows; an exported program that fails on it was most likely
    # exported with its batch size baked in.
    out = annotate(gm, example, DYNAMIC_BATCH_HINT if exported else None)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != ANALYSIS_BATCH:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ShapeError(f"the model returns {got}; the compiler handles models that return one "
                         f"[batch, classes] tensor")
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    total = sum(info(n).flops for n in nodes) // ANALYSIS_BATCH
    unsupported = Counter()
    for n in nodes:
        unsupported.update(info(n).unsupported)
    params = sum(p.numel() for p in gm.parameters())
    cuts = find_cut_points(gm, ANALYSIS_BATCH)
    num_classes = out.shape[1]
    budget = int(config.head_budget * params)
    for c in cuts:
        c.flops_before //= ANALYSIS_BATCH
        c.bytes //= ANALYSIS_BATCH
        c.shape = (-1,) + tuple(c.shape[1:])
        spec = plan_heads([c.shape], num_classes, budget // max(config.num_exits, 1),
                          config.max_feature_dim, [c.channels_last])[0]
        c.head_params = spec.params()
        c.head_flops = head_flops(spec, c.shape)
        c.score = score(c, total)
    return Analysis(gm, example, out, total, params, cuts, unsupported)


def check_leaf_modules(model: torch.nn.Module, names, exported: bool):
    """Each ``--leaf-module`` names a submodule (qualified name) or a class of ``model``."""
    if not names:
        return
    if exported:
        raise UsageError("--leaf-module applies to models torch.fx traces (a state dict with "
                         "--arch, a pickled module); a torch.export program is not traced "
                         "again, so drop --leaf-module")
    known, example = set(), None
    for qual, m in model.named_modules():
        known.update((qual, type(m).__name__))
        if qual and example is None:
            example = (qual, type(m).__name__)
    for name in names:
        if name not in known:
            hint = f"e.g. '{example[0]}' or '{example[1]}'" if example else "it has none"
            raise UsageError(f"--leaf-module '{name}' names no submodule or class of the model; "
                             f"give a qualified name or class name ({hint})")


def check_program_input(loaded: LoadedModel, input_shape):
    """A torch.export program checks its input against the shapes it was exported for: run it
    on one example of ``input_shape`` (at the batch size it was exported with), so a wrong
    --input-shape is a ShapeError here and not a silently different model once its guards are
    stripped for tracing."""
    if not loaded.exported or not loaded.input_shape or input_shape is None:
        return
    shape = (loaded.input_shape[0],) + tuple(input_shape[1:])
    fmt = ",".join(str(d) for d in input_shape)
    want = ",".join(str(d) for d in (1,) + tuple(loaded.input_shape[1:]))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded.module(torch.zeros(shape))
    except Exception as e:  # the guards raise AssertionError, the ops RuntimeError, ...
        raise ShapeError(f"--input-shape {fmt} does not fit the program ({brief(e)}); it was "
                         f"exported for {want}: pass --input-shape {want} or leave it out") \
            from None


def head_flops(spec: HeadSpec, shape) -> int:
    """FLOPs of one head on one row."""
    head = ExitHead(spec).eval()
    counter = FlopCounter()
    with torch.no_grad(), counter:
        head(torch.zeros((1,) + tuple(shape[1:])))
    return counter.flops


def select_cuts(an: Analysis, config: RewriteConfig) -> List[CutPoint]:
    """The cut points to place exits at: those named in config.exits, else an automatic spread."""
    if not an.cuts:
        raise NoCutPointError(
            "the model has no cut point: no single tensor carries all the state forward (a skip "
            "connection spans the whole network?); early exits cannot be placed in it")
    if config.exits:
        by_name = {c.name: c for c in an.cuts}
        unknown = [e for e in config.exits if e not in by_name]
        if unknown:
            raise CompilerError(f"not cut points: {', '.join(unknown)}; run with --report to list "
                                f"them")
        return sorted((by_name[e] for e in set(config.exits)), key=lambda c: c.position)
    chosen = choose_exits(an.cuts, config.num_exits, config.min_fraction, config.max_fraction)
    if not chosen:
        raise NoCutPointError(f"no cut point lies in the FLOPs range {config.min_fraction:g} to "
                              f"{config.max_fraction:g} of the model; name exits with --exits "
                              f"(see --report)")
    return chosen


def _script_stage(stage: fx.GraphModule, example: torch.Tensor):
    """Script a stage, its attention in exportable ops (``attention.py``); fall back to tracing
    it when its code is beyond TorchScript."""
    swap_attention(stage)   # the stage's own module tree: the analysed model keeps the original
    swap_window_attention(stage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.jit.script(stage)
        except Exception:
            return torch.jit.trace(stage, (example,), check_trace=False)


def build(an: Analysis, cuts: List[CutPoint], config: RewriteConfig):
    """Split at ``cuts``, attach heads, and script the result. Returns (module, head specs, stage FLOPs)."""
    num_classes = an.output.shape[1]
    specs = plan_heads([c.shape for c in cuts], num_classes,
                       int(config.head_budget * an.params), config.max_feature_dim,
                       [c.channels_last for c in cuts])
    stages = split_stages(an.gm, [c.name for c in cuts])
    torch.manual_seed(config.seed)
    blocks, h = [], an.example
    with torch.no_grad():
        for stage, spec in zip(stages[:-1], specs):
            scripted = _script_stage(stage, h)
            h = stage(h)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                blocks.append(artifact.ExitBlock(scripted, torch.jit.script(ExitHead(spec))))
        final = _script_stage(stages[-1], h)
    model = artifact.CachedModel(blocks, final).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    bounds = [0] + [c.flops_before for c in cuts] + [an.total_flops]
    stage_flops = [b - a for a, b in zip(bounds, bounds[1:])]
    return scripted, specs, stage_flops


def check_equal(module, an: Analysis, config: RewriteConfig):
    """The artifact must reproduce the model, with exits inactive, at several batch sizes."""
    g = torch.Generator().manual_seed(config.seed + 1)
    with torch.no_grad():
        for batch in (ANALYSIS_BATCH, 3, 1):
            x = torch.randn((batch,) + tuple(an.example.shape[1:]), generator=g)
            try:
                want = an.gm(x)
                got = module(x)
            except Exception as e:
                raise CompilerError(f"the staged model fails at batch size {batch} ({brief(e)}). "
                                    f"{DYNAMIC_BATCH_HINT}") from None
            if got.shape != want.shape or got.dtype != want.dtype or \
                    not torch.allclose(got, want, atol=config.atol, rtol=config.rtol):
                diff = (got - want).abs().max().item() if got.shape == want.shape else "shape"
                raise CompilerError(f"the staged model does not reproduce the original at batch "
                                    f"size {batch} (max diff {diff}); report this model")


def make_manifest(an: Analysis, cuts, specs, stage_flops, loaded: Optional[LoadedModel],
                  config: RewriteConfig) -> dict:
    exits = []
    for c, s in zip(cuts, specs):
        exits.append({"name": c.name, "flops_before": c.flops_before, "fraction": c.fraction,
                      "shape": list(c.shape), "bytes": c.bytes,
                      "head": dict(s.to_dict(), params=s.params(), flops=head_flops(s, c.shape))})
    return {
        "format_version": artifact.FORMAT_VERSION,
        "source_sha256": loaded.sha256 if loaded else None,
        "source_kind": loaded.source if loaded else "module",
        "input_shape": [-1] + list(an.example.shape[1:]),
        "input_dtype": str(an.example.dtype).replace("torch.", ""),
        "output_shape": [-1] + list(an.output.shape[1:]),
        "num_classes": int(an.output.shape[1]),
        "total_flops": an.total_flops,
        "backbone_params": an.params,
        "stage_flops": stage_flops,
        "exits": exits,
        "flops_note": "estimate; multiply-add = 2 FLOPs; ops in unsupported_ops counted as 0",
        "unsupported_ops": dict(an.unsupported),
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "head_params": sum(s.params() for s in specs),
        "head_budget_exceeded": sum(s.params() for s in specs) > config.head_budget * an.params,
        "config": {"num_exits": config.num_exits, "head_budget": config.head_budget,
                   "max_feature_dim": config.max_feature_dim,
                   "leaf_modules": list(config.leaf_modules)},
    }


def rewrite_module(model, input_shape, config: RewriteConfig = None, exported=False,
                   loaded: Optional[LoadedModel] = None):
    """Library entry: returns (scripted artifact module, manifest, analysis)."""
    config = config or RewriteConfig()
    if loaded is not None:
        check_program_input(loaded, input_shape)
    an = analyse(model, input_shape, config, exported)
    cuts = select_cuts(an, config)
    module, specs, stage_flops = build(an, cuts, config)
    check_equal(module, an, config)
    return module, make_manifest(an, cuts, specs, stage_flops, loaded, config), an


def format_report(an: Analysis, chosen: List[str]) -> str:
    """The cut point table --report prints."""
    lines = [f"model: {an.total_flops / 1e6:.2f} MFLOPs per row (estimate), "
             f"{an.params / 1e6:.3f} M params, {len(an.cuts)} cut points"]
    if an.unsupported:
        lines.append("ops without a FLOP rule (counted as 0): " +
                     ", ".join(f"{k} x{v}" for k, v in sorted(an.unsupported.items())))
    lines.append(f"{'':2}{'cut point':28}{'MFLOPs before':>14}{'frac':>7}  {'shape':22}"
                 f"{'KiB/row':>9}{'head params':>12}{'head kFLOPs':>12}{'score':>8}")
    for c in an.cuts:
        mark = "*" if c.name in chosen else (" " if c.preferred else "-")
        shape = "x".join(str(d) for d in c.shape[1:]) + (" (HWC)" if c.channels_last else "")
        lines.append(f"{mark:2}{c.name[:28]:28}{c.flops_before / 1e6:14.2f}{c.fraction:7.3f}  "
                     f"{shape:22}{c.bytes / 1024:9.1f}{c.head_params:12d}"
                     f"{c.head_flops / 1e3:12.1f}{c.score:8.3f}")
    lines.append("* chosen exit   - right before a norm/activation (not chosen by default)")
    if any(c.channels_last for c in an.cuts):
        lines.append("(HWC): a channels-last map [H, W, C]; its head pools over H and W")
    return "\n".join(lines)


def parse_shape(text: str):
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if len(shape) < 2:
        raise argparse.ArgumentTypeError(f"bad shape '{text}': give batch,dims... e.g. 1,3,224,224")
    try:
        return check_shape(shape)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).replace("--input-shape ", "", 1)) from None


def parse_exits(text: str) -> List[str]:
    names = [e.strip() for e in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"'{text}' has an empty name; give comma-separated cut "
                                         f"point names (see --report)")
    return names


MAX_CLASSES = 1_000_000


def check_paths(args, out_path: str):
    """Fail fast, before any work, on paths that cannot be right."""
    if os.path.isdir(args.model):
        raise UsageError(f"MODEL '{args.model}' is a directory; give the model file")
    for flag, path in (("-o/--output", out_path), ("--json", args.json)):
        if path is None:
            continue
        if os.path.isdir(path):
            raise UsageError(f"{flag} '{path}' is a directory; give a file path")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UsageError(f"{flag} '{path}': folder '{folder}' does not exist; create it first")
    if os.path.abspath(out_path) == os.path.abspath(args.model) or (
            os.path.exists(out_path) and os.path.exists(args.model)
            and os.path.samefile(out_path, args.model)):
        raise UsageError(f"-o/--output '{out_path}' is the model file itself; writing there would "
                         f"overwrite the model; give another path")
    if args.json is not None and os.path.abspath(args.json) in (os.path.abspath(args.model),
                                                                os.path.abspath(out_path)):
        raise UsageError(f"--json '{args.json}' would overwrite the model or the artifact; give "
                         f"another path")


def build_parser():
    p = ArgumentParser(prog="python -m compiler.rewrite", description=__doc__)
    p.add_argument("model", help="a .pt2 (torch.export), a state dict with --arch, or a pickled "
                                 "module with --allow-pickle")
    p.add_argument("-o", "--output", help="artifact path (default: <stem>.cached.pt beside MODEL)")
    p.add_argument("--arch", help="torchvision architecture of a state dict, e.g. resnet18")
    p.add_argument("--score-threshold", type=number(float, 0.0, 1.0), default=None,
                   help="detectors: the service's score threshold the 'nothing here' exits "
                        "answer for (default: the detector's own)")
    p.add_argument("--num-classes", type=number(int, 1, MAX_CLASSES),
                   help="classes of a state dict's model")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept a whole pickled nn.Module (unpickling runs code: trusted files only)")
    p.add_argument("--input-shape", type=parse_shape, help="example input, e.g. 1,3,224,224")
    p.add_argument("--leaf-module", action="append", default=[], metavar="NAME",
                   help="submodule (qualified or class name) fx must not trace into; repeatable")
    p.add_argument("--num-exits", type=number(int, 1, MAX_EXITS), default=RewriteConfig.num_exits,
                   help=f"how many exits to place, 1 to {MAX_EXITS} (default "
                        f"{RewriteConfig.num_exits}; fewer where the model has fewer cut points)")
    p.add_argument("--exits", type=parse_exits,
                   help="comma-separated cut point names to use (see --report)")
    p.add_argument("--head-budget", type=number(float, 0, 1, lo_open=True),
                   default=RewriteConfig.head_budget,
                   help="max heads' parameters as a fraction of the backbone's, in (0, 1]")
    p.add_argument("--max-feature-dim", type=number(int, 0), default=RewriteConfig.max_feature_dim,
                   help=f"max pooled values per exit, so the runtime's buffer holds enough rows "
                        f"(default {RewriteConfig.max_feature_dim}; 0: no cap)")
    p.add_argument("--report", action="store_true", help="print the cut point table")
    p.add_argument("--json", metavar="PATH", help="write the analysis and manifest as JSON")
    p.add_argument("--dry-run", action="store_true", help="analyse only; write no artifact")
    return p


def main(argv=None) -> int:
    """The CLI: 0 on success; 2 with one ``error: ...`` line on stderr for any bad input."""
    return run_cli(_main, argv, "try a smaller --input-shape or a machine with more memory")


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    config = RewriteConfig(input_shape=args.input_shape, leaf_modules=args.leaf_module,
                           num_exits=args.num_exits, head_budget=args.head_budget,
                           max_feature_dim=args.max_feature_dim,
                           exits=args.exits or []).validate()
    out_path = args.output or os.path.splitext(args.model)[0] + ".cached.pt"
    check_paths(args, out_path)
    from . import detection  # torchvision detectors: compiler/detection.py
    if detection.is_detector_arch(args.arch):
        loaded = detection.load_detector(args.model, args.arch, args.num_classes)
    else:
        loaded = load_model(args.model, args.arch, args.num_classes, args.allow_pickle)
    if detection.is_detector(loaded.module):
        return detection.compile_cli(loaded, args, out_path)
    shape = config.input_shape or loaded.input_shape
    check_program_input(loaded, shape)
    an = analyse(loaded.module, shape, config, loaded.exported)
    cuts = select_cuts(an, config)
    if args.report or args.dry_run:
        print(format_report(an, [c.name for c in cuts]))
    manifest = None
    if not args.dry_run:
        module, specs, stage_flops = build(an, cuts, config)
        check_equal(module, an, config)
        manifest = make_manifest(an, cuts, specs, stage_flops, loaded, config)
        artifact.save(module, manifest, out_path)
        heads = sum(e["head"]["params"] for e in manifest["exits"])
        print(f"wrote {out_path}: {len(cuts)} exits at "
              f"{', '.join(f'{c.name} ({c.fraction:.0%})' for c in cuts)}; heads "
              f"{heads} params ({heads / max(an.params, 1):.1%} of the backbone); "
              f"exits start inactive")
        if manifest["head_budget_exceeded"]:
            print(f"notice: the model is too small for heads within --head-budget "
                  f"{config.head_budget:g}; the smallest heads were used", file=sys.stderr)
        if not config.exits and len(cuts) < config.num_exits:
            print(f"notice: placed {len(cuts)} exits, not {config.num_exits}: the model has "
                  f"no more cut points far enough apart (see --report; --exits names them)",
                  file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"total_flops": an.total_flops, "params": an.params,
                       "unsupported_ops": dict(an.unsupported),
                       "cut_points": [c.to_dict() for c in an.cuts],
                       "chosen": [c.name for c in cuts], "manifest": manifest}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

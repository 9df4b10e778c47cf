"""Load a model from the forms the compiler accepts, and work out its example input shape.

Accepted: a torch.export program (``.pt2``), a state dict plus ``arch`` (a torchvision
classification model), or, only with ``allow_pickle``, a whole pickled ``nn.Module``.
"""
import contextlib
import hashlib
import logging
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .errors import ModelLoadError, first_line

SUPPORTED = ("a torch.export program (.pt2), a state dict with --arch NAME (a torchvision model), "
             "or a pickled nn.Module with --allow-pickle")


@dataclass
class LoadedModel:
    module: torch.nn.Module
    exported: bool                      # True: module is ExportedProgram.module()
    input_shape: Optional[Tuple[int, ...]]
    sha256: str
    source: str                         # "pt2" | "state_dict" | "pickle"


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_input_shape(arch: str) -> Tuple[int, ...]:
    """ImageNet-style input for torchvision classifiers (299 px for inception_v3)."""
    size = 299 if arch.startswith("inception") else 224
    return (1, 3, size, size)


def _zip_names(path):
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs a whole traceback for a broken archive; our one-line error says it all."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch._export", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _first_line(e: Exception) -> str:
    return first_line(e)


def load_model(path: str, arch: Optional[str] = None, num_classes: Optional[int] = None,
               allow_pickle: bool = False) -> LoadedModel:
    """Load ``path``; raise ModelLoadError naming the supported forms when it is none of them."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ModelLoadError(f"model '{path}' is a directory, not a model file; pass {SUPPORTED}")
    if not os.path.exists(path):
        raise ModelLoadError(f"model file '{path}' does not exist; pass {SUPPORTED}")
    if not os.path.isfile(path):
        raise ModelLoadError(f"model '{path}' is not a regular file; pass {SUPPORTED}")
    digest = sha256_of(path)
    names = _zip_names(path)
    if names is not None and any(n.endswith("constants.pkl") for n in names) and \
            any("/code/" in n for n in names):
        raise ModelLoadError(f"'{path}' is a TorchScript file, which cannot be traced; pass "
                             f"{SUPPORTED}")
    if names is not None and (path.endswith(".pt2") or
                              any("serialized_exported_program" in n for n in names)):
        try:
            with warnings.catch_warnings(), _quiet_torch_logs():
                warnings.simplefilter("ignore")
                ep = torch.export.load(path)
        except Exception as e:
            raise ModelLoadError(f"'{path}' is not a readable torch.export program "
                                 f"({_first_line(e)}); pass {SUPPORTED}") from None
        shape = None
        if getattr(ep, "example_inputs", None):
            args = ep.example_inputs[0]
            if len(args) == 1 and isinstance(args[0], torch.Tensor):
                shape = tuple(args[0].shape)
        if shape is None:
            vals = [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"
                    and n.name in ep.graph_signature.user_inputs]
            if len(vals) != 1:
                raise ModelLoadError(f"'{path}' takes {len(vals)} inputs; the compiler handles "
                                     f"models with exactly one tensor input")
            shape = tuple(int(d) if isinstance(d, int) else 2 for d in vals[0].shape)
        return LoadedModel(ep.module(), True, shape, digest, "pt2")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # refused a class: a pickled object, not garbage
            raise ModelLoadError(f"'{path}' is not a model file torch can read "
                                 f"({_first_line(e)}); pass {SUPPORTED}") from None
        if not allow_pickle:
            raise ModelLoadError(
                f"'{path}' is a pickled module; unpickling runs arbitrary code, so it is refused. "
                f"Re-run with --allow-pickle if you trust the file, or pass a torch.export .pt2 "
                f"or a state dict with --arch") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise ModelLoadError(f"'{path}' could not be unpickled ({_first_line(e2)}); the "
                                 f"classes it needs must be importable") from None
        if not isinstance(obj, torch.nn.Module):
            raise ModelLoadError(f"'{path}' unpickles to {type(obj).__name__}, not an nn.Module")
        return LoadedModel(obj.eval(), False, None, digest, "pickle")
    except Exception as e:
        raise ModelLoadError(f"'{path}' is not a model file torch can read ({_first_line(e)}); "
                             f"pass {SUPPORTED}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"'{path}' holds a {type(obj).__name__}, not a state dict; pass "
                             f"{SUPPORTED}")
    if not arch:
        raise ModelLoadError(f"'{path}' is a state dict; name its architecture with --arch "
                             f"(a torchvision model such as resnet18)")
    return LoadedModel(build_arch(arch, obj, num_classes), False, default_input_shape(arch),
                       digest, "state_dict")


def build_arch(arch: str, state_dict: dict, num_classes: Optional[int]) -> torch.nn.Module:
    """A torchvision classification model ``arch`` holding ``state_dict``."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise ModelLoadError(f"unknown --arch '{arch}'; use a torchvision classification model "
                             f"such as {', '.join(n for n in ('resnet18', 'mobilenet_v2', 'vit_b_16'))}")
    # The last 2-D weight in the state dict is the classifier's: its rows are the classes.
    mats = [v for v in state_dict.values() if v.dim() == 2]
    if num_classes is None:
        num_classes = mats[-1].shape[0] if mats else 1000
    elif mats and mats[-1].shape[0] != num_classes:
        # Checked before building: a huge --num-classes would allocate a huge classifier first.
        raise ModelLoadError(f"the state dict's classifier has {mats[-1].shape[0]} classes, not "
                             f"--num-classes {num_classes}; drop --num-classes or fix it")
    kwargs = {"aux_logits": False, "init_weights": False} if arch == "inception_v3" else {}
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise ModelLoadError(f"the state dict does not fit --arch {arch} with {num_classes} "
                             f"classes ({_first_line(e)}); check --arch and --num-classes") from None
    return model.eval()

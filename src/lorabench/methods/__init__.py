"""Methods as plug-ins: lorabench's own, and a user's by module path.

``method_of(cfg)`` (or ``resolve(name)``) gives the ``Method`` (base.py) a config names:
one of ``BUILT_IN`` by its name, or a user's class by ``package.module:ClassName``,
imported on first use (the module must be importable: installed, or on PYTHONPATH or
the current folder). Nothing outside this package tests a method's name.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
from functools import lru_cache
from pathlib import Path

from ..core.config import ConfigError, RunConfig
from .base import METHOD_FIELDS, TRAINING_FIELDS, Method, Start, canonical_settings
from .construction import Construction
from .dora import DoRA
from .final_layers import FinalLayers
from .full import FullFineTuning
from .lora import LoRAGradient
from .lora_from_construction import LoRAFromConstruction
from .pissa import PiSSA
from .vera import VeRA

BUILT_IN: dict[str, Method] = {m.name: m for m in (Construction(), LoRAGradient(), FinalLayers(), FullFineTuning(),
                                                   DoRA(), VeRA(), PiSSA(), LoRAFromConstruction())}
# What a method must define, by kind (a subclass that leaves one at Method's is refused).
REQUIRED = {False: ("parameter_count", "start", "adapt"), True: ("parameter_count", "construct")}

__all__ = ["BUILT_IN", "METHOD_FIELDS", "TRAINING_FIELDS", "Method", "Start", "canonical_settings", "ignored_fields",
           "method_of", "resolve", "validated"]


def method_of(cfg: RunConfig) -> Method:
    return resolve(cfg.method)


def validated(cfg: RunConfig) -> RunConfig:
    """``cfg.validated()`` with its method's own validation: the one to call on a config
    that is about to run."""
    return cfg.validated(method_of(cfg).validate)


def resolve(name: str) -> Method:
    """The method named ``name``; ConfigError naming what is wrong otherwise."""
    if not isinstance(name, str):
        raise ConfigError(f"method must be a string, got {name!r}")
    if name in BUILT_IN:
        return BUILT_IN[name]
    if ":" not in name:
        raise ConfigError(f"unknown method {name!r}: one of {', '.join(BUILT_IN)}, "
                          "or a method of your own as 'package.module:ClassName'")
    return _load(name)


@lru_cache(maxsize=None)
def _load(spec: str) -> Method:
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ConfigError(f"method {spec!r}: expected 'package.module:ClassName'")
    if "" not in sys.path and "." not in sys.path:
        sys.path.append("")  # the current folder, as `python -m` has it, after installed packages
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 (a user's module may fail in any way)
        raise ConfigError(f"method {spec!r}: module {module_name!r} does not import "
                          f"({type(error).__name__}: {error})") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"method {spec!r}: module {module_name!r} has no {class_name!r}")
    if not (inspect.isclass(cls) and issubclass(cls, Method)):
        raise ConfigError(f"method {spec!r}: {class_name!r} is not a subclass of lorabench.methods.Method")
    missing = [part for part in REQUIRED[bool(cls.closed_form)] if getattr(cls, part) is getattr(Method, part)]
    if missing:
        kind = "closed-form" if cls.closed_form else "gradient"
        raise ConfigError(f"method {spec!r}: a {kind} method must define {', '.join(missing)}")
    if cls.hand_written or cls.native:
        raise ConfigError(f"method {spec!r}: hand_written and native are for lorabench's own trainables")
    try:
        method = cls()
    except Exception as error:  # noqa: BLE001
        raise ConfigError(f"method {spec!r}: {class_name}() failed ({type(error).__name__}: {error})") from None
    method.name = spec
    method.digest = _source_digest(module)
    return method


def _source_digest(module) -> str:
    """SHA-256 of the module's source file (of its package folder's .py files, for a package)."""
    path = Path(inspect.getsourcefile(module) or module.__file__)
    files = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def ignored_fields(method: Method) -> tuple[str, ...]:
    """The RunConfig fields ``method`` never reads: the workflow leaves them at their
    defaults for its runs (so a construction is not repeated over the lr grid)."""
    skipped = TRAINING_FIELDS if method.closed_form else ()
    return skipped + tuple(f for f in METHOD_FIELDS if f not in method.fields)

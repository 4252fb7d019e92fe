"""Which modules run compiled (Cython, see setup.py), and never a stale one.

The per-message modules below may be compiled next to their source (``make
build`` in place, or ``pip install .``, when Cython and a C compiler are
present). Python would import such a ``.so`` in preference to the ``.py`` even
after the source was edited. So the build writes beside each extension the
SHA-256 of the source it was compiled from (``<extension>.sha256``), and
:func:`install_guard` (run by ``router/__init__.py`` before any of them is
imported) loads from source every module whose source no longer matches, or
whose digest is missing: an edit always takes effect, and a stale build is
reported, never run. Content, not mtimes: a wheel install or a checkout may
leave any order of timestamps.

This module imports nothing outside the standard library: setup.py reads
:data:`COMPILED_MODULES` from it before the dependencies are installed.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

# The per-message path; measured in the commit that introduced them (setup.py).
COMPILED_MODULES: tuple[str, ...] = (
    "router.model",
    "router.engine",
    "router.smpp.pdu",
    "router.smpp.session",
    "router.smpp.transport",
    "router.carriers.carrier",
    "router.carriers.correlate",
    "router.carriers.ratelimit",
    "router.carriers.receipt",
    "router.ingress.smpp",
    "router.ingress.validate",
    "router.ingress.concat",
    "router.store.spool",
    "router.store.trafficlog",
    "router.text.gsm7",
    "router.text.segment",
    "router.routing",
    "router.observe.metrics",
    "router.ingress.http",
    "router.dlr.webhooks",
    "router.sim.smsc",  # the built-in carrier simulator shares the box in benchmarks
)

_ROOT = os.path.dirname(os.path.abspath(__file__))
_stale: set[str] = set()


def extensions_disabled() -> bool:
    """``SMS_ROUTER_NO_EXTENSIONS`` set (not empty, not 0): build and run pure Python."""
    return os.environ.get("SMS_ROUTER_NO_EXTENSIONS", "") not in ("", "0")


def source_path(name: str, root: str = _ROOT) -> str:
    """The ``.py`` of a module of this package, under *root* (the package dir)."""
    base = os.path.join(root, *name.split(".")[1:])
    return os.path.join(base, "__init__.py") if os.path.isdir(base) else base + ".py"


def _paths(name: str) -> tuple[str, str | None]:
    """(source .py, compiled extension or None) of a module of this package."""
    src = source_path(name)
    base = src[:-3]
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if os.path.exists(base + suffix):
            return src, base + suffix
    return src, None


DIGEST_SUFFIX = ".sha256"


def source_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def stale_modules(names: Sequence[str] = COMPILED_MODULES) -> list[str]:
    """Compiled modules not built from their current source (~1 ms for all)."""
    out = []
    for name in names:
        src, ext = _paths(name)
        if ext is None:
            continue
        try:
            with open(ext + DIGEST_SUFFIX) as f:
                built_from = f.read().strip()
        except OSError:
            built_from = ""
        try:
            if built_from != source_digest(src):
                out.append(name)
        except OSError:
            continue  # no source to fall back to (a stripped install): keep the extension
    return out


class _SourceFirst:
    """A meta-path finder that loads the listed modules from their ``.py``."""

    def find_spec(
        self, fullname: str, path: object, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _stale:
            return None
        src, _ = _paths(fullname)
        is_pkg = os.path.basename(src) == "__init__.py"
        loader = importlib.machinery.SourceFileLoader(fullname, src)
        return importlib.util.spec_from_file_location(
            fullname,
            src,
            loader=loader,
            submodule_search_locations=[os.path.dirname(src)] if is_pkg else None,
        )


def install_guard() -> None:
    """Route stale compiled modules to their source; idempotent.

    ``SMS_ROUTER_NO_EXTENSIONS=1`` at run time loads every listed module from
    source (the pure-Python build, e.g. to compare the two).
    """
    if extensions_disabled():
        _stale.update(COMPILED_MODULES)
    else:
        _stale.update(stale_modules())
    if _stale and not any(isinstance(f, _SourceFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFirst())


def status() -> dict[str, object]:
    """What runs compiled: for the start-up log line, /readyz-style reports and tests."""
    compiled: list[str] = []
    interpreted: list[str] = []
    for name in COMPILED_MODULES:
        mod = sys.modules.get(name)
        path = getattr(mod, "__file__", None) if mod is not None else None
        if path is None:
            path = _paths(name)[1] if name not in _stale else None
        is_ext = path is not None and not path.endswith(".py")
        (compiled if is_ext else interpreted).append(name)
    return {
        "kind": "all" if not interpreted else "none" if not compiled else "partial",
        "compiled": compiled,
        "interpreted": interpreted,
        "stale": [] if extensions_disabled() else sorted(_stale),
    }


def report(require_compiled: bool = False) -> int:
    """``sms-router build-info``: import the listed modules, print :func:`status`.

    Exit status 1 with *require_compiled* unless every one runs compiled and
    fresh (the Docker build uses it).
    """
    import importlib
    import json

    for name in COMPILED_MODULES:
        importlib.import_module(name)
    st = status()
    print(json.dumps(st, indent=2))
    return 1 if require_compiled and (st["interpreted"] or st["stale"]) else 0

"""Optional compiled build of the per-message modules (everything else is in pyproject.toml).

The router is CPU-bound on one core (README, Performance), and most of that
core goes to interpreting the per-message path: PDU decode/encode, the SMPP
session, routing, the engine, the spool and traffic-log row encoders and the
metrics. Cython compiles those modules *unchanged* (they stay plain Python,
no cdef types): measured on smpp-e2e, 7,691 -> 8,730 msg/s and ~110 -> ~92 us
of router CPU per message (commit message of this change).

Like aiohttp, yarl and multidict, the compiled modules are optional:

* ``SMS_ROUTER_NO_EXTENSIONS=1`` at install time builds none;
* a machine without a C compiler (or a failed compile) gets a warning and the
  pure-Python modules, which remain the source of truth and behave the same;
* ``router.accel.status()`` (logged at start-up, exported as
  ``smsrouter_build_info``) says which modules run compiled, and refuses to
  count a compiled module whose source is newer (a stale in-place build).
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from router.accel import COMPILED_MODULES  # noqa: E402  (no third-party imports)


class OptionalBuildExt(build_ext):
    """A failed compile costs speed, never the install."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if not self.parallel:
            self.parallel = os.cpu_count() or 1  # one gcc per core

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001  (compiler missing, headers missing, ...)
            self._warn(exc)

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc, ext.name)

    @staticmethod
    def _warn(exc: Exception, name: str = "extensions") -> None:
        print(f"WARNING: sms-router: not compiling {name} ({exc}); the pure-Python "
              "module is used instead (slower, same behaviour)", file=sys.stderr)


def _extensions() -> list:  # type: ignore[type-arg]
    if os.environ.get("SMS_ROUTER_NO_EXTENSIONS", "") not in ("", "0"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("WARNING: sms-router: Cython not available; pure-Python modules only",
              file=sys.stderr)
        return []
    directives = {
        "language_level": 3,
        # Python semantics exactly: annotations are documentation, never C types
        # (an `int` argument must still accept an IntEnum, a bool, a subclass).
        "annotation_typing": False,
        "binding": True,
        "always_allow_keywords": True,
    }
    extensions = []
    for name in COMPILED_MODULES:
        source = name.replace(".", "/") + ".py"
        if not os.path.exists(source):
            source = source[:-3] + "/__init__.py"
        try:  # one module Cython cannot translate costs that module only
            extensions += cythonize([source], quiet=True, compiler_directives=directives)
        except Exception as exc:  # noqa: BLE001  (Cython's CompileError and kin)
            OptionalBuildExt._warn(exc, name)
    return extensions


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})

"""Optional compiled build of the per-message modules (everything else is in pyproject.toml).

The router is CPU-bound on one core (README, Performance), and most of that
core goes to interpreting the per-message path: PDU decode/encode, the SMPP
session, routing, the engine, the spool and traffic-log row encoders and the
metrics. Cython compiles those modules *unchanged* (they stay plain Python,
no cdef types). Measured A/B on one machine in one hour (README, Performance;
benchmarks/results/build-ab/): smpp-e2e ~7,800 -> ~8,500 msg/s, router CPU
per message ~108 -> ~97 us; http-batch ~3% less CPU per message.

Like aiohttp, yarl and multidict, the compiled modules are optional:

* ``SMS_ROUTER_NO_EXTENSIONS=1`` at install time builds none;
* a machine without a C compiler (or a failed compile) gets a warning and the
  pure-Python modules, which remain the source of truth and behave the same;
* ``router.accel.status()`` (logged at start-up, exported as
  ``smsrouter_build_info``) says which modules run compiled; a compiled module
  whose source changed since (its ``.sha256`` beside it no longer matches)
  runs from source instead and is reported stale.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from router.accel import (  # noqa: E402  (stdlib only)
    COMPILED_MODULES,
    DIGEST_SUFFIX,
    extensions_disabled,
    source_digest,
    source_path,
)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _write(path: str, digest: str) -> None:
    with open(path, "w") as f:
        f.write(digest + "\n")


class OptionalBuildExt(build_ext):
    """A failed compile costs speed, never the install.

    Each extension carries the digest of the source it is built from, taken
    *before* Cython read it (``_extensions``). A compiled file is reused only
    when the digest recorded beside it is that one; otherwise it is rebuilt,
    whatever the timestamps say (an edit with an older mtime, or during a
    build, must never leave old code looking fresh).
    """

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
        digest = getattr(ext, "source_digest", "")
        target = self.get_ext_fullpath(ext.name)
        if _read(target + DIGEST_SUFFIX) != digest and os.path.exists(target):
            # Not known to be built from this source: build it again. (Removing
            # it, not setting self.force: extensions build in parallel threads.)
            os.remove(target)
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc, ext.name)
            return
        if digest:
            _write(target + DIGEST_SUFFIX, digest)

    def copy_extensions_to_source(self) -> None:
        """In place (``make build``): each extension's digest goes with it;
        one that failed to build is skipped (its module stays interpreted)."""
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            if not os.path.exists(regular_file):
                continue
            self.copy_file(regular_file, inplace_file, level=self.verbose)
            if os.path.exists(regular_file + DIGEST_SUFFIX):
                self.copy_file(regular_file + DIGEST_SUFFIX, inplace_file + DIGEST_SUFFIX,
                               level=self.verbose)

    @staticmethod
    def _warn(exc: Exception, name: str = "extensions") -> None:
        print(f"WARNING: sms-router: not compiling {name} ({exc}); the pure-Python "
              "module is used instead (slower, same behaviour)", file=sys.stderr)


def _extensions() -> list:  # type: ignore[type-arg]
    if extensions_disabled():
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
    # Relative paths (cythonize names modules from them); digests taken before
    # Cython reads a source, so they describe what it compiles.
    sources = {name: source_path(name, root="router") for name in COMPILED_MODULES}
    digests = {name: source_digest(src) for name, src in sources.items()}
    changed = [n for n, src in sources.items()
               if _read(src[:-3] + ".c" + DIGEST_SUFFIX) != digests[n]]
    if changed:
        # The first build takes a minute or two; say so rather than look hung.
        print(f"sms-router: compiling {len(changed)} per-message module(s) whose source "
              "changed (Cython + C compiler; a first build takes a minute or two)",
              file=sys.stderr, flush=True)
    extensions = []
    for name, source in sources.items():
        digest = digests[name]
        c_file = source[:-3] + ".c"
        try:  # one module Cython cannot translate costs that module only
            # Cython regenerates a .c only if the .py is newer: not good enough.
            exts = cythonize([source], quiet=True, compiler_directives=directives,
                             force=name in changed)
        except Exception as exc:  # noqa: BLE001  (Cython's CompileError and kin)
            OptionalBuildExt._warn(exc, name)
            continue
        _write(c_file + DIGEST_SUFFIX, digest)
        for ext in exts:
            ext.source_digest = digest
            ext.optional = True
        extensions += exts
    return extensions


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})

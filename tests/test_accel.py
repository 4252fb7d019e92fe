"""The compiled build (setup.py, router/accel.py): used, never stale, same behaviour.

The rest of the suite runs against whatever the import system picks, which
after `make build` is the compiled modules; these tests make sure that is so,
that an edited source never runs as its old compiled self, and that the
pure-Python modules still pass the codec, session, text and metrics tests.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from router import accel

ROOT = Path(__file__).resolve().parent.parent
PURE = accel.extensions_disabled()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SMS_ROUTER_NO_EXTENSIONS"}
    if PURE:
        env["SMS_ROUTER_NO_EXTENSIONS"] = "1"  # what this run asked for, unless overridden
    env.update(extra)
    return env


def _probe(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter importing the router copy in tmp_path."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(PYTHONPATH=str(tmp_path)),
    )


def test_this_run_uses_the_build_it_asked_for() -> None:
    for name in accel.COMPILED_MODULES:
        importlib.import_module(name)
    st = accel.status()
    if PURE:
        assert st["compiled"] == [], st
        return
    assert st["stale"] == [], f"stale compiled modules {st['stale']}: run `make build`"
    assert st["interpreted"] == [], (
        f"not compiled: {st['interpreted']}; run `make build` (needs a C compiler), "
        "or set SMS_ROUTER_NO_EXTENSIONS=1 to test the pure-Python build on purpose"
    )
    for name in accel.COMPILED_MODULES:
        assert not sys.modules[name].__file__.endswith(".py"), name


def test_cli_reports_and_requires() -> None:
    exe = Path(sys.executable).parent / "sms-router"
    out = subprocess.run(
        [str(exe), "build-info"], capture_output=True, text=True, env=_env(), timeout=60, check=True
    )
    st = json.loads(out.stdout)
    assert sorted(st["compiled"]) == ([] if PURE else sorted(accel.COMPILED_MODULES))
    required = subprocess.run(
        [str(exe), "build-info", "--require-compiled"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert required.returncode == (1 if PURE else 0), required.stdout + required.stderr
    pure = subprocess.run(
        [str(exe), "build-info", "--require-compiled"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(SMS_ROUTER_NO_EXTENSIONS="1"),
    )
    assert pure.returncode == 1
    assert json.loads(pure.stdout)["compiled"] == []


@pytest.mark.skipif(PURE, reason="needs the compiled build to make one stale")
def test_edited_source_runs_instead_of_its_stale_compiled_module(tmp_path: Path) -> None:
    # A copy of the package with its compiled files; then "edit" one source.
    shutil.copytree(
        ROOT / "router", tmp_path / "router", ignore=shutil.ignore_patterns("__pycache__")
    )
    src = tmp_path / "router" / "ingress" / "validate.py"
    assert list(src.parent.glob("validate.*.so")), "no compiled validate module to go stale"
    src.write_text(src.read_text() + "\nEDITED = True\n")
    # Timestamps prove nothing (a checkout or a wheel install sets them in any
    # order): make the edited source look *older* than its compiled module.
    os.utime(src, (0, 0))
    # A compiled module whose digest is missing cannot be vouched for either.
    gsm7 = tmp_path / "router" / "text"
    for digest in gsm7.glob("gsm7.*.so" + accel.DIGEST_SUFFIX):
        digest.unlink()
    probe = (
        "import json, router.accel as a, router.ingress.validate as v, router.smpp.pdu as p,"
        " router.text.gsm7 as g;"
        "print(json.dumps([v.__file__, getattr(v, 'EDITED', False), p.__file__, g.__file__,"
        " a.status()['stale']]))"
    )
    out = _probe(tmp_path, probe)
    assert out.returncode == 0, out.stderr
    v_file, edited, p_file, g_file, stale = json.loads(out.stdout)
    assert v_file == str(src) and edited is True
    assert g_file == str(gsm7 / "gsm7.py")
    assert p_file.startswith(str(tmp_path)) and not p_file.endswith(".py")  # others stay compiled
    assert stale == ["router.ingress.validate", "router.text.gsm7"]


@pytest.mark.skipif(PURE, reason="this run is the pure-Python build already")
def test_pure_python_build_passes_the_unit_suites() -> None:
    files = [
        "test_smpp_codec.py",
        "test_smpp_session.py",
        "test_text.py",
        "test_metrics_fast.py",
        "test_concat.py",
    ]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-x",
            *[str(ROOT / "tests" / f) for f in files],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(SMS_ROUTER_NO_EXTENSIONS="1"),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " failed" not in out.stdout


@pytest.mark.skipif(PURE, reason="needs the compiled build")
def test_rebuild_compiles_an_edit_whatever_its_timestamp(tmp_path: Path) -> None:
    # The build must not trust timestamps either: an edit that looks older than
    # the compiled module (cp -p, rsync -a, tar) is compiled by the next build.
    if not (ROOT / "build").is_dir():
        pytest.skip("no incremental build directory (run `make build`)")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tmp_path / name)
    for name in ("router", "build"):
        shutil.copytree(
            ROOT / name,
            tmp_path / name,
            symlinks=True,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    src = tmp_path / "router" / "ingress" / "validate.py"
    src.write_text(src.read_text() + "\nEDITED = True\n")
    os.utime(src, (0, 0))
    build = subprocess.run(
        [sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert build.returncode == 0, build.stderr[-3000:]
    probe = (
        "import json, router.accel as a, router.ingress.validate as v;"
        "print(json.dumps([v.__file__, getattr(v, 'EDITED', False), a.status()['stale']]))"
    )
    out = _probe(tmp_path, probe)
    assert out.returncode == 0, out.stderr
    v_file, edited, stale = json.loads(out.stdout)
    assert not v_file.endswith(".py") and edited is True and stale == []

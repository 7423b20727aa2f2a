"""Build zdproxy: the hot modules compiled with mypyc where possible, pure Python otherwise.

Everything else (metadata, dependencies, packages) lives in pyproject.toml; this file
only decides whether to add mypyc's extension modules:

- ``ZDPROXY_PURE=1`` (any value but empty or ``0``) installs pure Python;
- an editable install (``pip install -e .``) is pure: compiled ``.so`` files written
  into the source tree would shadow the ``.py`` files being edited;
- no C compiler or no Python headers: pure, with a message saying why;
- mypyc failing (while generating C, or the compiler while building it): pure, with
  the error, so ``pip install .`` still works on any machine.

mypy (which carries mypyc), pydantic and PyYAML with its stubs (the hot modules'
types import the config package) are asked for as build requirements only when
compiling is possible (``setup_requires``, which setuptools' PEP 517 backend turns
into the build's requirements), pinned like requirements/test-constraints.txt.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

# What compiling needs, each pin equal to requirements/test-constraints.txt (a unit
# test checks): mypy carries mypyc; mypyc type-checks the hot modules strictly, and
# they import the config package (pydantic, yaml), so without those (and the yaml
# stubs) the check fails and the build falls back to pure Python. pip builds the
# wheel before it installs the dependencies: a fresh virtualenv has none of them yet.
BUILD_PINS = ["mypy==2.4.1", "pydantic==2.14.4", "PyYAML==6.0.4", "types-PyYAML==6.0.12.20261122"]

# The hot path: the data path (proxy/), HTTP policy (http/) and balancing/. The
# rest of the package (config, admin, control, health: aiohttp and pydantic code
# off the data path) stays Python: compiling it would buy nothing per request.
HOT_PACKAGES = ("zdproxy/proxy", "zdproxy/http", "zdproxy/balancing")
# Modules of the hot packages that stay Python, and why:
# - http/routes.py: its classes are Generic dataclasses with slots=True, which
#   mypyc 2.4 compiles but cannot import (dataclasses rebuilds the class for its
#   slots: "attribute '__dict__' of 'type' objects is not writable"). Routes are
#   matched once per request only when `routes:` are configured.
NOT_COMPILED = {"zdproxy/http/routes.py"}

ROOT = Path(__file__).resolve().parent


def say(message: str) -> None:
    # stderr: pip shows it with -v, and in full when the build fails
    print(f"zdproxy build: {message}", file=sys.stderr)


def hot_modules() -> list[str]:
    found = sorted(
        str(path.relative_to(ROOT))
        for package in HOT_PACKAGES
        for path in (ROOT / package).glob("*.py")
    )
    return [module for module in found if module not in NOT_COMPILED]


def why_pure() -> str | None:
    """The reason to install pure Python, or None to compile."""
    if os.environ.get("ZDPROXY_PURE", "") not in ("", "0"):
        return "ZDPROXY_PURE is set"
    if any(command in sys.argv for command in ("editable_wheel", "develop")):
        return "editable install (compiled modules would shadow the sources)"
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler} not found)"
    include = sysconfig.get_paths().get("include", "")
    if not (Path(include) / "Python.h").is_file():
        return f"no Python headers ({include}/Python.h missing)"
    return None


class OptionalBuildExt(build_ext):
    """Building the C extensions is optional: on failure the wheel keeps the pure
    ``.py`` modules (always installed beside the extensions) and the install goes on."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # compiler errors come in several classes
            say(f"compiling failed, installing pure Python: {exc}")
            self.extensions = []


def compiled_extensions() -> list[Any]:
    """mypyc's extensions, or [] (with the reason said) to install pure Python."""
    reason = why_pure()
    if reason is not None:
        say(f"pure Python build: {reason}")
        return []
    # mypyc type-checks and writes C at setup time: only when a build is asked for
    # (not for metadata, nor for the build requirements query)
    if not any(cmd in sys.argv for cmd in ("bdist_wheel", "build", "build_ext", "install")):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        say(f"pure Python build: mypyc is not importable ({BUILD_PINS[0]} gives it)")
        return []
    try:
        extensions: list[Any] = mypycify(
            hot_modules(), opt_level="3", target_dir="build/compiled/mypyc"
        )
    except BaseException as exc:  # mypy reports errors with SystemExit
        say(f"mypyc failed, installing pure Python: {exc!r}")
        return []
    say(f"compiling {len(hot_modules())} modules with mypyc")
    return extensions


EXTENSIONS = compiled_extensions()
setup(
    ext_modules=EXTENSIONS,
    cmdclass={"build_ext": OptionalBuildExt},
    setup_requires=BUILD_PINS if why_pure() is None else [],
    # a build directory per kind: a pure build must not pick up the extension
    # modules a compiled build left in build/lib (the wheel takes all of it)
    options={"build": {"build_base": "build/compiled" if EXTENSIONS else "build/pure"}},
)

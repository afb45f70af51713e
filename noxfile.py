# /// script
# requires-python = ">=3.11"
# dependencies = ["nox>=2025.2.9"]
# ///
"""Every task of the workspace: `uv run noxfile.py` runs the default sessions.

Each session syncs its own environment from the lock file (`uv sync --frozen`)
with only the dependency groups it needs, so the core's tests prove the core
imports with no agent framework installed, and the SDK majors are tested apart.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "uv"
nox.options.error_on_missing_interpreters = True
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml(ROOT / "core" / "pyproject.toml")
PYTHONS = nox.project.python_versions(PYPROJECT)
nox.options.pythons = [PYTHONS[0]]
nox.options.sessions = ["lint", "typecheck", "tests", "integration", "demo"]

# SDK majors: openai 3.x / anthropic 2.x, and openai 2.x / anthropic 0.73 (what
# CrewAI and LlamaIndex pin).
SDKS = {"latest": "sdk-latest", "legacy": "sdk-legacy"}

# The benchmarks that need only the core (typechecked with it).
BENCHMARKS = (
    "overhead.py",
    "ledger.py",
    "report.py",
    "profile_hot_path.py",
    "callgrind.py",
)
# Each framework integration in its own environment: the package, its framework
# and the SDKs its tests drive (CrewAI and LlamaIndex bring openai 2.x).
INTEGRATIONS = {
    "langchain": ("langchain", "sdk-latest"),
    "crewai": ("crewai",),
    "llamaindex": ("llamaindex",),
}


def sync(session: nox.Session, *groups: str) -> None:
    """Install the locked workspace with exactly ``groups`` into the session's venv."""
    env = {
        "UV_PROJECT_ENVIRONMENT": session.virtualenv.location,
        "UV_PYTHON_DOWNLOADS": "never",
    }
    args = [
        "uv",
        "sync",
        "--frozen",
        "--no-default-groups",
        "--python",
        session.python or PYTHONS[0],
    ]
    for group in groups:
        args += ["--group", group]
    session.run_install(*args, env=env, silent=True)


@nox.session(python=PYTHONS)
@nox.parametrize("sdk", list(SDKS))
def tests(session: nox.Session, sdk: str) -> None:
    """Run the core's tests against one SDK major."""
    sync(session, "test", SDKS[sdk])
    ignore = [f"--ignore=tests/{name}" for name in INTEGRATIONS]
    session.run(
        "pytest", *(session.posargs or ["tests", *ignore]), env={"PYTHONHASHSEED": "0"}
    )


@nox.session(python=PYTHONS[0])
@nox.parametrize("framework", list(INTEGRATIONS))
def integration(session: nox.Session, framework: str) -> None:
    """Type-check and test one framework integration, alone in its environment."""
    sync(session, "test", "typecheck", *INTEGRATIONS[framework])
    package = ROOT / "integrations" / framework / "src"
    session.run(
        "mypy", str(package / f"allowance_{framework}"), env={"MYPYPATH": str(package)}
    )
    # Its benchmark, against this framework's types (the others are missing here).
    session.run(
        "mypy",
        str(ROOT / "benchmarks" / "frameworks.py"),
        env={"MYPYPATH": str(package)},
    )
    session.run(
        "pytest",
        *(session.posargs or [f"tests/{framework}"]),
        env={"PYTHONHASHSEED": "0"},
    )


@nox.session(python=PYTHONS[0])
def lint(session: nox.Session) -> None:
    """Check style with ruff (lint and format)."""
    sync(session, "lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHONS[0])
def typecheck(session: nox.Session) -> None:
    """Check types with mypy --strict (library, README examples, benchmarks)."""
    sync(session, "typecheck", "sdk-latest")
    session.run("mypy")
    session.run("mypy", "tests/typing")
    # The benchmarks (frameworks.py with no framework installed: each
    # integration session checks it again against its framework's types).
    session.run(
        "mypy",
        *(str(ROOT / "benchmarks" / name) for name in (*BENCHMARKS, "frameworks.py")),
    )


@nox.session(python=PYTHONS[0])
def demo(session: nox.Session) -> None:
    """Run the offline demo (the README's first command)."""
    sync(session, "demo")
    session.chdir(session.create_tmp())
    session.run("allowance", "demo")


@nox.session(python=PYTHONS[0], default=False)
def bench(session: nox.Session) -> None:
    """Measure the guard's overhead against the raw SDK and its peers; print tables."""
    sync(session, "bench", "sdk-latest")
    # One table: each ledger, streaming, concurrency, estimation and the peers
    # (tokencap, llm-toll, tokenfence), measured side by side in one run.
    session.run("python", str(ROOT / "benchmarks" / "overhead.py"), *session.posargs)
    session.run("python", str(ROOT / "benchmarks" / "ledger.py"))
    session.run("python", str(ROOT / "benchmarks" / "report.py"))
    # Where a guarded call's time goes: pyinstrument's tree of the hot path.
    session.run("python", str(ROOT / "benchmarks" / "profile_hot_path.py"))


@nox.session(python=PYTHONS[0], default=False)
def bench_callgrind(session: nox.Session) -> None:
    """Count what the guard adds to a call on a simulated CPU: no machine noise.

    Needs valgrind (Debian: ``apt-get install valgrind``); ~5 min on 2 cores.
    """
    sync(session, "bench", "sdk-latest")
    session.run("python", str(ROOT / "benchmarks" / "callgrind.py"), *session.posargs)


@nox.session(python=PYTHONS[0], default=False)
@nox.parametrize("framework", list(INTEGRATIONS))
def bench_frameworks(session: nox.Session, framework: str) -> None:
    """Measure what one framework adapter adds to a call, against the raw framework."""
    sync(session, *INTEGRATIONS[framework])
    session.run(
        "python",
        str(ROOT / "benchmarks" / "frameworks.py"),
        "--framework",
        framework,
        *session.posargs,
    )


if __name__ == "__main__":
    os.chdir(ROOT)
    nox.main()

"""Keep CrewAI offline, quiet and out of the home directory, before it is imported.

CrewAI reads these at import time: telemetry and tracing off (otherwise it
looks up telemetry.crewai.com), and every file it writes (task output
database, credentials key, config) goes to a temporary directory.
"""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

_HOME = tempfile.mkdtemp(prefix="allowance-crewai-tests-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)

OFFLINE_ENV = {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_DISABLE_TRACKING": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "OTEL_SDK_DISABLED": "true",
    # No first-run trace prompt, no .crewai/last_run.json in the working dir.
    "CREWAI_TESTING": "true",
    "CREWAI_STORAGE_DIR": "allowance-crewai-tests",
    "HOME": _HOME,
    "XDG_DATA_HOME": os.path.join(_HOME, "data"),  # noqa: PTH118
    "XDG_CONFIG_HOME": os.path.join(_HOME, "config"),  # noqa: PTH118
    "XDG_CACHE_HOME": os.path.join(_HOME, "cache"),  # noqa: PTH118
}
os.environ.update(OFFLINE_ENV)

import warnings  # noqa: E402

with warnings.catch_warnings():
    # CrewAI's import raises ImportWarnings (pytest turns warnings into errors).
    warnings.simplefilter("ignore")
    import crewai

import allowance  # noqa: E402


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep the offline settings for every test; undo any guard left installed."""
    for name, value in OFFLINE_ENV.items():
        monkeypatch.setenv(name, value)
    yield
    allowance.unpatch()
    from allowance_crewai import uninstall

    uninstall()
    _collect_crewai_clients()


def _collect_crewai_clients() -> None:
    """Collect the test's crews now, with the SDK clients CrewAI built for them.

    ``crewai.LLM`` builds an OpenAI or Anthropic client and has no ``close()``;
    crews, agents and LLMs hold each other in cycles, so those clients' sockets
    close only when the garbage collector gets to them, and each then warns
    ``ResourceWarning: unclosed socket``. Left to chance, that collection can
    fall in another test, or after the last one, where pytest (warnings are
    errors here) fails the run. CrewAI's leak, not allowance's: collected here,
    at the end of the test that made it, with that warning silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def build_crew(
    llm: Any,
    roles: tuple[str, ...] = ("researcher",),
    tasks: tuple[tuple[str, str], ...] | None = None,
    **crew_options: Any,
) -> crewai.Crew:
    """A small crew: one agent per role, one task per (name, role)."""
    agents = {
        role: crewai.Agent(
            role=role,
            goal=f"Be a good {role}.",
            backstory="Terse.",
            llm=llm,
            max_iter=3,
            max_retry_limit=2,
            verbose=False,
        )
        for role in roles
    }
    plan = tasks if tasks is not None else tuple((f"{r}-task", r) for r in roles)
    return crewai.Crew(
        agents=list(agents.values()),
        tasks=[
            crewai.Task(
                name=name,
                description=f"Do the {name} in one line.",
                expected_output="One line.",
                agent=agents[role],
            )
            for name, role in plan
        ],
        verbose=False,
        **crew_options,
    )


@pytest.fixture
def make_crew() -> Callable[..., crewai.Crew]:
    """Return ``build_crew``: ``make_crew(llm, roles, tasks, **crew_options)``."""
    return build_crew


_CREWAI_WARNINGS = (
    # CrewAI's own internals use its deprecated fields; not ours to fix.
    "ignore::DeprecationWarning:crewai",
    "ignore::PendingDeprecationWarning:crewai",
    "ignore::ImportWarning",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tolerate CrewAI's internal deprecation warnings in this directory only."""
    here = os.path.dirname(__file__)  # noqa: PTH120
    for item in items:
        if str(item.path).startswith(here):
            for spec in _CREWAI_WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(spec))

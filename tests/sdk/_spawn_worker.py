"""Run in a spawned process by ``test_concurrency``: guarded calls on a shared ledger.

Started with ``runpy.run_path(..., run_name=RUN_NAME, init_globals={"PARAMS": ...})``
so the child does not need to import the test package. Writes ``"<ok> <blocked>"``
to ``PARAMS["out"]``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

RUN_NAME = "__allowance_spawn_worker__"


def main(
    *,
    base_url: str,
    ledger: str,
    session: str,
    limit: int,
    body: dict[str, Any],
    calls: int,
    threads: int,
    barrier: Any,
    out: str,
) -> None:
    import openai

    import allowance

    client = openai.OpenAI(api_key="test", base_url=base_url, max_retries=0, timeout=30)
    guarded: Any = allowance.wrap(client, limit, ledger=ledger, session=session)

    def one(_: int) -> bool:
        try:
            client.chat.completions.create(**body)
        except allowance.BudgetExceeded:
            return False
        return True

    barrier.wait(timeout=60)
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(one, range(calls)))
    client.close()
    guarded.allowance.guard.close()
    ok = sum(results)
    Path(out).write_text(f"{ok} {len(results) - ok}")


if __name__ == RUN_NAME:
    main(**PARAMS)  # type: ignore[name-defined]  # noqa: F821 - given by run_path

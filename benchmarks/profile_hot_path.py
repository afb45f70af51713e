"""Profile the guarded hot path with pyinstrument: where a guarded call's time goes.

Usage: ``uv run noxfile.py -s bench`` runs it last, or
``python benchmarks/profile_hot_path.py -n 5000 [--ledger sqlite:///x.db]``.

Runs N guarded chat completions against the fake provider (in a child
process, no delay) under pyinstrument's sampler and prints the call tree of
allowance's own frames: intercept -> estimate -> begin (reserve) -> the SDK's
request -> usage -> commit. Compare it with the same tree of the raw SDK to
see what the guard adds.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import openai
from overhead import RemoteProvider, chat
from pyinstrument import Profiler

import allowance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--calls", type=int, default=5000)
    parser.add_argument("--ledger", default="memory://")
    args = parser.parse_args()
    fake = RemoteProvider()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ledger = args.ledger.replace("{tmp}", str(Path(tmp)))
            client = allowance.wrap(
                openai.OpenAI(
                    base_url=fake.openai_base_url, api_key="x", max_retries=0
                ),
                budget="$1000",
                ledger=ledger,
            )
            call = chat(client)
            for _ in range(200):
                call()
            profiler = Profiler(interval=0.0001)
            with profiler:
                for _ in range(args.calls):
                    call()
            client.allowance.guard.close()  # type: ignore[attr-defined]  # set by wrap()
    finally:
        fake.stop()
    print(
        profiler.output_text(
            unicode=True, color=False, show_all=False, time="percent_of_total"
        )
    )


if __name__ == "__main__":
    main()

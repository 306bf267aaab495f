"""`run()`: the demo from start to end, and the signals that end it (each ending stops both children)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from rich.console import Console

from mendloop.demo import scenario
from mendloop.demo.common import DemoError, report
from mendloop.demo.stage import Demo
from mendloop.demo.story import Story, instructions


def run(*, port: int, service_port: int | None, state_dir: Path, exit_after: bool, story: bool, out: Console) -> int:
    """Start both, walk the story (or stage the spec's scenario and print its curl tests), serve until stopped. 0 when
    the story's run completed."""
    demo = Demo(port=port, service_port=service_port, state=state_dir.resolve(), out=out, story_mode=story)
    result: int | None = None
    with _signals_interrupt():
        try:
            demo.prepare()
            demo.start()
            # Without the story, the service starts in the spec's scenario, staged before demo.json says "ready":
            # the spec's curl tests are then the first thing anyone types.
            staged = [] if story else scenario.stage(demo.service_url)
            demo.write_info()
            demo.banner()
            for line in staged:
                out.print(line, markup=False)
            if story:
                try:
                    result = 0 if Story(demo).story() else 1
                except KeyError as exc:
                    report(out, DemoError(f"unexpected answer from mendloop: no field {exc}"))
                    result = 1
                except DemoError as exc:
                    # Keep serving (unless --exit) so a person can look at what went wrong; a dead child still ends it.
                    report(out, exc)
                    result = 1
                out.print("[green]Story complete.[/]" if result == 0 else "[red]The story did not end in completed.[/]")
            else:
                instructions(demo)
                result = 0
            if not exit_after:
                demo.serve_forever()
            return result
        except DemoError as exc:
            report(out, exc)
            return 1
        except KeyboardInterrupt:
            out.print("stopping")
            return 130 if result is None else result
        finally:
            with _signals_ignored():
                demo.stop()


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP end the demo as Ctrl-C does, so the same cleanup stops the children. SIGINT is set too:
    a shell starts background jobs with it ignored, and "Ctrl-C stops both" should hold for `kill -INT` as well."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """A second Ctrl-C must not cut the cleanup short and leave a child running; the cleanup has its deadlines."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

"""``python -m flask_meisa.emulator``: serve the emulator until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from .handle import Emulator
from .ratelimit import parse_rules
from .state import DEFAULT_RATE_LIMIT

__all__ = ["main"]

#: How the command is named when run as a module.
_PROG = "python -m flask_meisa.emulator"


def _limit(value: str) -> str | None:
    if value.strip().lower() in ("", "none", "off"):
        return None
    try:
        parse_rules(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def _guardrail(value: str) -> str | None:
    return "seed" if value == "seed" else _limit(value)


def _rate(value: str) -> float:
    rate = float(value)
    if not 0 <= rate <= 1:
        raise argparse.ArgumentTypeError("must be within [0, 1]")
    return rate


def build_parser(prog: str = _PROG) -> argparse.ArgumentParser:
    """The command line's options; ``prog`` names the command in its help."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the Meisa emulator (a stateful Meisa API) until SIGINT/SIGTERM.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8025, help="port, 0 for any (default 8025)")
    parser.add_argument("--seed", default="demo", help="seed JSON file (default: the demo)")
    parser.add_argument(
        "--rate-limit",
        type=_limit,
        default=DEFAULT_RATE_LIMIT,
        help=f'per-key limit, "none" to disable (default "{DEFAULT_RATE_LIMIT}")',
    )
    parser.add_argument(
        "--send-guardrail",
        type=_guardrail,
        default="seed",
        help='per-recipient send limit, e.g. "3/hour", "none" (default: the seed\'s)',
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before answers")
    parser.add_argument("--error-rate", type=_rate, default=0.0, help="share of 5xx answers")
    parser.add_argument("--drop-rate", type=_rate, default=0.0, help="share of dropped calls")
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = _PROG) -> int:
    """Run the emulator; returns the exit status. ``prog`` names the command in its help."""
    args = build_parser(prog).parse_args(argv)
    kwargs = {} if args.send_guardrail == "seed" else {"send_guardrail": args.send_guardrail}
    try:
        emulator = Emulator(
            seed=args.seed, rate_limit=args.rate_limit, host=args.host, port=args.port, **kwargs
        )
        emulator.start()
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    emulator.faults.set(latency=args.latency, error_rate=args.error_rate, drop_rate=args.drop_rate)
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"Meisa emulator listening on {emulator.url}", flush=True)
        print(f"Inbox and admin endpoints: {emulator.root_url}/_emulator/", flush=True)
        if emulator.is_demo:
            print("Demo keys (keys of this local emulator only, not secrets):", flush=True)
            for name, key in emulator.keys.items():
                print(f"  {name}: {key}", flush=True)
        else:
            print(f"Keys from the seed: {', '.join(emulator.keys)}", flush=True)
        print("Press Ctrl+C to stop.", flush=True)
        while not done.wait(0.5):
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        emulator.stop()
    print("Stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

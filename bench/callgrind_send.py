"""Instructions per forwarded send (valgrind's callgrind): a CPU figure that a shared machine does not blur.

The gateway (this checkout, or ``--code DIR`` another checkout of the code, run
with this checkout's venv) runs under ``valgrind --tool=callgrind
--instr-atstart=no`` in front of ``gateway_perf.py``'s stub homeserver; after
``--warmup`` sends, instrumentation is switched on (``callgrind_control -i on``)
for ``--sends`` clean-form ``POST /send`` at ``--inflight`` outstanding, then
off.  Prints the instructions counted divided by the sends.  Under valgrind the
gateway is ~50x slower, so more answers go out as separate responses than
natively (printed as ``sep``); compare runs of this script with each other::

    .venv/bin/python bench/callgrind_send.py                            # ~5 min
    .venv/bin/python bench/callgrind_send.py --code /tmp/perf-lean-base  # other code
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]

import gateway_perf  # noqa: E402  (the stub homeserver, the gateway's config and load generator)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", type=Path, help="another checkout whose comatrix package to run")
    parser.add_argument("--sends", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--inflight", type=int, default=4)
    args = parser.parse_args()
    from support.gateway import GatewayProcess

    with tempfile.TemporaryDirectory(prefix="comatrix-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"

        class Instrumented(GatewayProcess):
            def command(self) -> list[str]:
                prefix = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
                if args.code is not None:
                    prefix = ["env", f"PYTHONPATH={args.code.resolve()}"] + prefix
                return prefix + super().command()

        stub, port = gateway_perf.start_stub()
        gw: Any = Instrumented(f"http://127.0.0.1:{port}", Path(tmp) / "gw",
                               config_text=gateway_perf.gateway_config(16), log_level="warn")
        try:
            gw.start(timeout=900)
            gateway_perf.load(gateway_perf.SendLoad, gw.port, args.warmup, args.inflight)
            subprocess.run(["callgrind_control", "-i", "on", str(gw.pid)], check=True, capture_output=True)
            result = gateway_perf.load(gateway_perf.SendLoad, gw.port, args.sends, args.inflight)
            subprocess.run(["callgrind_control", "-i", "off", str(gw.pid)], check=True, capture_output=True)
        finally:
            gw.stop(timeout=120)
            stub.terminate()
            stub.wait(10)
        total = 0
        for dump in Path(tmp).glob("callgrind.out*"):
            for line in dump.read_text(errors="replace").splitlines():
                if line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
    print(f"{total / args.sends / 1e6:.3f} M instructions per forwarded send ({args.sends} sends, "
          f"{args.inflight} in flight, bad {result.bad_responses}, sep {result.separate_responses})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The runtime's verbs, as the entry points hand them over:
  run OUT NAME [ARGS...]        out/vms/NAME/run.sh (leanvm.runtime.launch)
  cluster OUT ME [ARGS...]      out/cluster.sh, ME being how it was called (leanvm.runtime.clustercli)
  start-switch OUT              the cluster switch started if none runs (run.sh --print's line)
"""

from __future__ import annotations

import sys
from pathlib import Path

from leanvm.errors import LeanvmError
from leanvm.state.layout import Names

VERBS = {"run": 2, "cluster": 2, "start-switch": 1}  # each verb's least number of arguments


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in VERBS or len(argv) - 1 < VERBS[argv[0]]:
        print("leanvm-runtime.pyz: usage: run OUT NAME [ARGS...] | cluster OUT ME [ARGS...] | start-switch OUT "
              "(out/vms/NAME/run.sh and out/cluster.sh run it)", file=sys.stderr)
        return 2
    verb, out = argv[0], Path(argv[1])
    # each verb imports only its own modules: what a VM's launcher imports, it holds while the VM runs
    if verb == "cluster":
        from leanvm.runtime import clustercli

        return clustercli.main(out, argv[2], argv[3:])
    try:
        if verb == "run":
            from leanvm.runtime import launch

            return launch.run(out, argv[2], argv[3:])
        from leanvm.runtime import switch

        net = out / Names.OUT_NET
        with switch.locked(net):
            switch.start(net)
        return 0
    except LeanvmError as e:
        print(f"run.sh: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

"""A stand-in for `python -m jobs.cli <stage> ...` for the local executor, the way tests/k8s/fake_kubectl.py stands in
for a cluster: it publishes a real manifest for the stage at each --output (the manifests its arguments name as
inputs), recording the run its environment names, and prints the last one's URI. Usage: fake_stage.py STAGE ARGS...
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("FAKE_KUBE_STATE", tempfile.gettempdir())

from common import manifest as mf  # noqa: E402
from tests.k8s.fake_kubectl import publish_for  # noqa: E402


def main(argv: list[str]) -> int:
    stage, args = argv[0], argv[1:]
    publish_for(stage, args, f"local-{stage}", dict(os.environ))
    outputs = [value for flag, value in zip(args, args[1:], strict=False) if flag == "--output"]
    print(mf.manifest_uri(outputs[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

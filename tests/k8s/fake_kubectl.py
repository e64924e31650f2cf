"""A stand-in for kubectl + a cluster, for testing `ftjobs k8s submit` where no cluster runs.

It answers the calls submit makes. `create -f -` "runs" the Job at once: it reads the
container arguments the way the stage would (after `launch ... --` for a multi-node train, whose
headless Service it records as created), and publishes a real manifest for that stage
under the Job's --output (on the real test S3 server), with every manifest the arguments
name recorded as an input. `kustomize` goes to the real kubectl.

Env: FAKE_KUBE_STATE (folder for Job state), FAKE_KUBE_REAL (the real kubectl),
FAKE_KUBE_FAIL ("key:code[,key:code]", key a stage or a piece of a Job name: that pod exits with code; the evaluate
gate's code 4 still publishes first, as evaluate does).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

STATE = Path(os.environ["FAKE_KUBE_STATE"])
INPUT_FLAGS = {"--input": "data", "--model": "model", "--prompts": "prompts", "--predictions": "predictions"}


def publish_for(stage: str, args: list[str], name: str, env: dict[str, str]) -> None:
    from common import manifest as mf

    outputs = [value for flag, value in zip(args, args[1:], strict=False) if flag == "--output"]
    inputs = []
    for flag, value in zip(args, args[1:], strict=False):
        if flag in INPUT_FLAGS and value.endswith("/manifest.json"):
            loaded = mf.load(value, verify="none")
            inputs.append(loaded.ref(INPUT_FLAGS[flag]))
    for output in outputs:  # an infer serving several adapters publishes one manifest per output
        config = {"args": args, "job": name, "output": output}
        if mf.check_output(output, stage=stage, config=config, inputs=inputs) is None:
            # as common.stage records it: the run the Job's environment names (FTJOBS_RUN_ID, FTJOBS_CELLS)
            manifest = mf.build(stage=stage, run_id=env.get(mf.RUN_ID_ENV) or name, config=config, inputs=inputs,
                                artifacts=[], cells=[c for c in env.get(mf.CELLS_ENV, "").split(",") if c])
            mf.publish(output, manifest)


def main(argv: list[str]) -> int:
    if "--namespace" in argv:
        i = argv.index("--namespace")
        with (STATE / "namespaces.log").open("a") as log:
            log.write(argv[i + 1] + "\n")
        argv = argv[:i] + argv[i + 2:]
    if argv[0] == "kustomize":
        os.execv(os.environ["FAKE_KUBE_REAL"], [os.environ["FAKE_KUBE_REAL"], *argv])
    if argv[:3] == ["create", "-f", "-"]:
        job = yaml.safe_load(sys.stdin.read())
        name = job["metadata"]["name"]
        if job["kind"] == "Service":
            if (STATE / f"service-{name}.json").exists():
                print(f'Error from server (AlreadyExists): services "{name}" already exists', file=sys.stderr)
                return 1
            with (STATE / "created.log").open("a") as log:
                log.write(f"service/{name}\n")
            (STATE / f"service-{name}.json").write_text(json.dumps(job))
            print(f"service/{name} created")
            return 0
        state = STATE / f"{name}.json"
        if state.exists():
            print(f'Error from server (AlreadyExists): jobs.batch "{name}" already exists', file=sys.stderr)
            return 1
        container = job["spec"]["template"]["spec"]["containers"][0]
        args = container["args"]
        if args[0] == "launch":  # torchrun's options, then the stage's command line
            args = args[args.index("--") + 1:]
        stage, args = args[0], args[1:]
        fails = dict(item.split(":") for item in filter(None, os.environ.get("FAKE_KUBE_FAIL", "").split(",")))
        # a key is a stage, or a piece of one Job's name (a sweep's step key)
        code = int(next((c for key, c in fails.items() if key == stage or (len(key) > 6 and key in name)), 0))
        env = {e["name"]: e.get("value") or "" for e in container.get("env", [])}
        if code in (0, 4):
            publish_for(stage, args, name, env)
        state.write_text(json.dumps({"code": code, "args": args, "image": container["image"],
                                     "completions": job["spec"].get("completions"),
                                     "env": env,
                                     "command": container["args"]}))
        with (STATE / "created.log").open("a") as log:
            log.write(name + "\n")
        print(f"job.batch/{name} created")
        return 0
    if argv[:2] == ["get", "job"]:
        code = json.loads((STATE / f"{argv[2]}.json").read_text())["code"]
        cond = {"type": "Complete", "status": "True"} if code == 0 else \
            {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": f"exit code {code}"}
        print(json.dumps({"status": {"conditions": [cond]}}))
        return 0
    if argv[:2] == ["get", "pods"]:
        name = argv[argv.index("-l") + 1].split("=", 1)[1]
        code = json.loads((STATE / f"{name}.json").read_text())["code"]
        status = {"containerStatuses": [{"state": {"terminated": {"exitCode": code}}}]}
        print(json.dumps({"items": [{"status": status}]}))
        return 0
    if argv[0] == "logs":
        print(f"last log line of {argv[1]}")
        return 0
    print(f"fake kubectl: unexpected call {argv}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

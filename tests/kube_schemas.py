"""Writes the Kubernetes JSON schemas bundled by the `kubernetes-validate` package in the layout
kubeconform reads offline: DST/v<version>-standalone-strict/<kind>-<group>-<version>.json.

The bundled schemas carry `$id`s on kubernetes.io and absolute `/api/_definitions.json` refs
meant for that package's own loader; both are rewritten so every ref resolves to a local file.

usage: kube_schemas.py VERSION DST      (e.g. 1.34.0 /tmp/schemas)
"""

import json
import os
import sys

import kubernetes_validate

version, dst = sys.argv[1], sys.argv[2]
src = os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema", f"v{version}-local-strict")
out = os.path.join(dst, f"v{version}-standalone-strict")
os.makedirs(out, exist_ok=True)


def fix(v):
    if isinstance(v, dict):
        return {
            k: (x.replace("/api/_definitions.json", "_definitions.json") if k == "$ref" and isinstance(x, str) else fix(x))
            for k, x in v.items()
            if k != "$id"
        }
    if isinstance(v, list):
        return [fix(x) for x in v]
    return v


n = 0
for name in os.listdir(src):
    if name.endswith(".json"):
        with open(os.path.join(src, name)) as f, open(os.path.join(out, name), "w") as g:
            json.dump(fix(json.load(f)), g)
        n += 1
print(f"{n} schemas in {out}")

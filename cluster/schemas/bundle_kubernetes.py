"""Write kubernetes-v1.35.json: Kubernetes' own schemas for the objects the templates hold, in one file.

    pip download --no-deps kubernetes-validate==1.37.0 -d /tmp/kv && unzip -q /tmp/kv/*.whl -d /tmp/kv
    python cluster/schemas/bundle_kubernetes.py \
        /tmp/kv/kubernetes_validate/kubernetes-json-schema/v1.35.0-local-strict/_definitions.json

Takes the definitions the roots below reach ($ref by $ref), drops their descriptions (prose, most
of the bytes) and points every $ref inside this one file; nothing else changes.
"""

import json
import os
import re
import sys

ROOTS = ["io.k8s.api.core.v1.PodTemplateSpec", "io.k8s.api.core.v1.PersistentVolumeClaim"]
ID = "https://kubernetes.io/api/v1.35.0/core.json"
REF = re.compile(r"^.*#/\$defs/")


def _reached(defs: dict) -> list[str]:
    seen, todo = set(), list(ROOTS)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += re.findall(r'"\$ref": "[^"]*#/\$defs/([^"]+)"', json.dumps(defs[name]))
    return sorted(seen)


def _clean(node, names: bool = False):
    """``names``: node maps property names to schemas, so a property called description stays."""
    if isinstance(node, dict):
        return {k: REF.sub("#/$defs/", v) if k == "$ref" else _clean(v, k == "properties" and not names)
                for k, v in node.items() if names or k != "description"}
    if isinstance(node, list):
        return [_clean(v) for v in node]
    return node


def main(definitions: str) -> None:
    with open(definitions) as f:
        defs = json.load(f)["$defs"]
    bundle = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": ID,
              "$defs": {name: _clean(defs[name]) for name in _reached(defs)}}
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kubernetes-v1.35.json")
    with open(out, "w") as f:
        json.dump(bundle, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])

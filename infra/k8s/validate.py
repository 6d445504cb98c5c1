"""Validate infra/k8s offline: no cluster, no kubectl (its --dry-run=client needs a server).

    python infra/k8s/validate.py [DIR]          # DIR defaults to this file's directory

1. Renders the kustomization the way `kubectl apply -k` would for what it uses here (resources,
   images, the configMapGenerator, JSON-6902 `replace` patches; the generator's hash suffix is
   left out).
2. Validates every rendered resource against the Kubernetes OpenAPI schemas of KUBERNETES
   (kubernetes-validate, strict: an unknown field is an error).
3. Checks what the schemas cannot: the workers' Job is Indexed with WORLD_SIZE equal to its
   completions and parallelism and to the job file's distributed.workers; every ConfigMap and
   Secret a pod mounts is generated or documented; each restart-policy rule maps effnet's exit
   codes (75 restart, 2 bad input).

Exits 0 and prints one line per resource when all is well, else 1 with one line per problem.
"""

import copy
import os
import sys

import kubernetes_validate
import yaml

KUBERNETES = "1.33.0"
# Created by the operator (kustomization.yaml says how), not generated.
DOCUMENTED_SECRETS = {"effnet-token", "effnet-store"}


def load_all(path):
    with open(path) as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def replace(document, path, value):
    keys = [int(k) if k.isdigit() else k for k in path.strip("/").split("/")]
    target = document
    for key in keys[:-1]:
        target = target[key]
    if isinstance(keys[-1], int):
        if keys[-1] >= len(target):
            raise KeyError(path)
    elif keys[-1] not in target:
        raise KeyError(path)
    target[keys[-1]] = value


def render(directory):
    kustomization = load_all(os.path.join(directory, "kustomization.yaml"))[0]
    documents = []
    for resource in kustomization.get("resources", []):
        documents.extend(load_all(os.path.join(directory, resource)))
    images = {image["name"]: image for image in kustomization.get("images", [])}
    for document in documents:
        for container in containers(document):
            image = images.get(container["image"])
            if image:
                container["image"] = f"{image['newName']}:{image['newTag']}"
    for generator in kustomization.get("configMapGenerator", []):
        data = {}
        for entry in generator.get("files", []):
            key, _, file = entry.partition("=")
            file = file or key
            with open(os.path.join(directory, file)) as handle:
                data[os.path.basename(key)] = handle.read()
        documents.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data}
        )
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        operations = yaml.safe_load(patch["patch"])
        matched = [
            d for d in documents if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]
        ]
        if not matched:
            raise ValueError(f"patch target {target} matches no resource")
        for document in matched:
            for operation in operations:
                if operation["op"] != "replace":
                    raise ValueError(f"unsupported patch op {operation['op']}")
                replace(document, operation["path"], operation["value"])
    for pairs in kustomization.get("labels", []):
        for document in documents:
            document["metadata"].setdefault("labels", {}).update(pairs["pairs"])
    return kustomization, documents


def pod_spec(document):
    spec = document.get("spec", {})
    return spec.get("template", {}).get("spec") if "template" in spec else None


def containers(document):
    pod = pod_spec(document)
    return pod.get("containers", []) if pod else []


def check(directory, kustomization, documents):
    problems = []
    names = {(d["kind"], d["metadata"]["name"]) for d in documents}
    for document in documents:
        pod = pod_spec(document)
        if not pod:
            continue
        for volume in pod.get("volumes", []):
            if "configMap" in volume and ("ConfigMap", volume["configMap"]["name"]) not in names:
                problems.append(f"{document['metadata']['name']}: ConfigMap {volume['configMap']['name']} is not generated")
            if "secret" in volume and volume["secret"]["secretName"] not in DOCUMENTED_SECRETS:
                problems.append(f"{document['metadata']['name']}: Secret {volume['secret']['secretName']} is not documented")
        for container in containers(document):
            if not container["image"].startswith(kustomization["images"][0]["newName"]):
                problems.append(f"{document['metadata']['name']}: image {container['image']} is not the kustomization's")
    jobs = [d for d in documents if d["kind"] == "Job"]
    if len(jobs) != 1:
        return problems + [f"expected one workers Job, found {len(jobs)}"]
    job = jobs[0]
    spec = job["spec"]
    worker = containers(job)[0]
    env = {e["name"]: e.get("value") for e in worker.get("env", [])}
    with open(os.path.join(directory, "job.yaml")) as handle:
        workers = yaml.safe_load(handle)["distributed"]["workers"]
    sizes = {
        "completions": spec.get("completions"),
        "parallelism": spec.get("parallelism"),
        "WORLD_SIZE": int(env.get("WORLD_SIZE") or 0),
        "job.yaml distributed.workers": workers,
    }
    if len(set(sizes.values())) != 1:
        problems.append(f"world sizes disagree: {sizes}")
    if spec.get("completionMode") != "Indexed":
        problems.append("the workers Job must be Indexed (the completion index is the rank)")
    if pod_spec(job).get("restartPolicy") != "Never":
        problems.append("a podFailurePolicy needs restartPolicy: Never")
    actions = {}
    for rule in spec.get("podFailurePolicy", {}).get("rules", []):
        for code in rule.get("onExitCodes", {}).get("values", []):
            actions[code] = rule["action"]
    if actions.get(75) != "Ignore" or actions.get(2) != "FailJob":
        problems.append(f"exit 75 must be Ignore (relaunch) and 2 FailJob, got {actions}")
    if "$(EFFNET_JOB_KEY)" not in worker.get("args", []) or "EFFNET_JOB_KEY" not in env:
        problems.append("workers must submit with the Job's uid as --key (EFFNET_JOB_KEY)")
    return problems


def main():
    directory = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    try:
        kustomization, documents = render(directory)
    except (OSError, KeyError, ValueError, yaml.YAMLError) as error:
        print(f"ERROR rendering {directory}: {error!r}")
        return 1
    problems = []
    for document in documents:
        name = f"{document['kind'].lower()}/{document['metadata']['name']}"
        try:
            kubernetes_validate.validate(copy.deepcopy(document), KUBERNETES, strict=True)
            print(f"valid {name} (Kubernetes {KUBERNETES}, strict)")
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{name}: {'.'.join(str(p) for p in error.path)}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(f"{name}: no schema: {error}")
    problems.extend(check(directory, kustomization, documents))
    for problem in problems:
        print(f"ERROR {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""Checks message bodies against docs/job.schema.json with Python's jsonschema
(pinned by scripts/emulators.sh), for tests/job_schema.rs.

    validate.py SCHEMA < bodies

Each input line is one message body, as a JSON string. Each output line is a
JSON object: "job" is null when the body is a job the schema accepts (an SNS
notification whose Message is one counts), else the validator's first error;
"producer" is the same against $defs/producerJob, what a producer sends.
"""

import json
import sys

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

URI = "job.schema.json"


def first_error(validator, instance):
    error = next(iter(validator.iter_errors(instance)), None)
    return None if error is None else f"{list(error.absolute_path)}: {error.message}"


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        schema = json.load(f)
    Draft202012Validator.check_schema(schema)
    registry = Registry().with_resource(URI, Resource.from_contents(schema))

    def validator(ref):
        return Draft202012Validator({"$ref": f"{URI}{ref}"}, registry=registry)

    job, producer, sns = validator("#"), validator("#/$defs/producerJob"), validator("#/$defs/snsNotification")
    for line in sys.stdin:
        body = json.loads(line)
        try:
            instance = json.loads(body)
        except ValueError as e:
            print(json.dumps({"job": f"not JSON: {e}", "producer": f"not JSON: {e}"}), flush=True)
            continue
        # The schema's snsNotification: its Message is a job, as JSON text.
        if sns.is_valid(instance):
            try:
                instance = json.loads(instance["Message"])
            except ValueError as e:
                print(json.dumps({"job": f"Message is not JSON: {e}", "producer": "-"}), flush=True)
                continue
        print(json.dumps({"job": first_error(job, instance), "producer": first_error(producer, instance)}), flush=True)


if __name__ == "__main__":
    main()

"""The CloudFormation template as Python data, read as CloudFormation reads
it: each short-form intrinsic (`!Ref X`, `!Sub …`) becomes `{"!Ref": "X"}`,
so the stack test and the request-template checks read one parse."""

from pathlib import Path

import yaml

TEMPLATE = Path(__file__).resolve().parent.parent / "config" / "cloudformation.yaml"


class Loader(yaml.SafeLoader):
    pass


def _tagged(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {"!" + suffix: value}


Loader.add_multi_constructor("!", _tagged)


def template():
    return yaml.load(TEMPLATE.read_text(), Loader=Loader)

"""Run configs for the trainer tests: a base mapping with dotted-key changes, validated."""
import copy

from fastjac.training import config


def config_with(base: dict, **changes):
    """``base`` (a config mapping, not modified) with ``changes`` (dotted keys) applied, as a validated RunConfig."""
    data = copy.deepcopy(base)
    for key, value in changes.items():
        config.set_dotted(data, key, value)
    return config.from_mapping(data)

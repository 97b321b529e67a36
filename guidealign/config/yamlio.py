"""YAML for configs: how config files and overrides are read (``yaml_load``) and how an
effective config is written back (``dump_yaml`` in the package uses ``dumper()``). PyYAML is
imported on first use (~9 ms of a command's start)."""
from __future__ import annotations

import functools
import re
import sys


class ConfigError(ValueError):
    """A config that cannot be used: bad YAML, an unknown key, a value of the wrong type or range."""


INT_TEXT = re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$")
FLOAT_TEXT = re.compile(r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9]+[eE][-+]?[0-9]+"
                        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")


def yaml_errors() -> tuple:
    """PyYAML's error class, for an ``except`` clause, once PyYAML is loaded; before that no YAML
    was read, so none can have been raised. (PyYAML is loaded with the first file or override
    read: a command given neither, such as a plain ``guidealign ingest``, never loads it.)"""
    y = sys.modules.get("yaml")
    return (y.YAMLError,) if y is not None else ()


@functools.lru_cache(maxsize=None)
def loader():
    """The YAML loader for configs: a key given twice in one mapping is an error (last-wins would
    drop the first silently), and only plain decimal numbers are numbers: YAML 1.1 would read 0755
    as 493, 2024_05_01 as 20240501 and 1:30 as 90, while leaving 1e-4 text. Those stay text here
    (a text field keeps them as written; a number field refuses them)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # "<<: *anchor": YAML's merge key, which SafeLoader flattens below
                key = self.construct_object(key_node, deep=deep)
                try:
                    hash(key)
                except TypeError:
                    raise ConfigError(f"a key must be text, not a {type(key).__name__} (line "
                                      f"{key_node.start_mark.line + 1})") from None
                if key in seen:
                    raise ConfigError(f"the key {key!r} is given twice in one mapping (line "
                                      f"{key_node.start_mark.line + 1}): keep one")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    Loader.yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in rs if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
        for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", INT_TEXT, list("-+0123456789"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_TEXT, list("-+0123456789."))
    return Loader


@functools.lru_cache(maxsize=None)
def dumper():
    """The YAML dumper for configs: quotes every string that ``loader()`` or YAML 1.1 would read
    as something else (``1e5`` is a number to the loader, text to YAML 1.1), so a dumped config
    loads back as it was."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.yaml_implicit_resolvers = {}
    for table in (yaml.SafeDumper.yaml_implicit_resolvers, loader().yaml_implicit_resolvers):
        for ch, rs in table.items():
            have = Dumper.yaml_implicit_resolvers.setdefault(ch, [])
            have += [r for r in rs if r not in have]
    return Dumper


def yaml_load(text: str):
    """A config file's or an override's YAML (see ``loader``)."""
    import yaml

    return yaml.load(text, Loader=loader())


